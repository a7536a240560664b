import json
from pathlib import Path

import pytest

from nanovllm_jax import bench
from nanovllm_jax.random_models import RANDOM_CONFIGS, tensor_shapes


def test_bench_on_the_mock_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--backend", "mock", "--num-seqs", "6", "--min-input-len", "4", "--max-input-len", "40",
                "--min-output-len", "2", "--max-output-len", "12", "--json", str(out)])
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["engine"] == "nanovllm_jax[mock]"
    assert run["output_tok_s"] > 0 and run["total_tok_s"] > run["output_tok_s"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert run[key]["p50"] <= run[key]["p99"]
    assert run["compilations_after_warmup"] is None and run["process_peak_rss_mb"] > run["rss_held_mb"] >= 0
    assert result["workload"]["num_seqs"] == 6
    if Path("/proc/cpuinfo").exists():  # the CPU's name (platform.processor() is empty on Linux)
        assert result["machine"]["processor"] and result["machine"]["processor"] in Path("/proc/cpuinfo").read_text()
    workload = bench.make_workload(bench.parse_args(["--num-seqs", "6", "--min-input-len", "4", "--max-input-len", "40",
                                                     "--min-output-len", "2", "--max-output-len", "12"]), 1024)
    assert (result["workload"]["input_tokens"], result["workload"]["output_tokens"]) == (
        workload.input_tokens, workload.output_tokens)  # as printed, and what the tok/s divide
    assert run["output_tok_s"] * run["run_s"] == pytest.approx(workload.output_tokens)


def test_bench_json_has_no_nan_when_no_request_has_a_second_token(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--backend", "mock", "--num-seqs", "3", "--min-output-len", "1", "--max-output-len", "1",
                "--json", str(out)])
    (run,) = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))["runs"]
    assert run["tpot_ms"] == {"p50": None, "p99": None} and run["ttft_ms"]["p50"] > 0


def test_bench_rounds_report_the_median_round(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--backend", "mock", "--num-seqs", "4", "--min-input-len", "4", "--max-input-len", "20",
                "--min-output-len", "2", "--max-output-len", "6", "--rounds", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["rounds"] == 3 and len(result["all_rounds"]) == 3
    speeds = sorted(r[0]["output_tok_s"] for r in result["all_rounds"])
    assert result["runs"][0]["output_tok_s"] == speeds[1]


def test_speedup_is_the_median_of_per_round_ratios():
    rounds = [[{"output_tok_s": a}, {"output_tok_s": b}] for a, b in ((10, 5), (30, 10), (20, 4))]
    assert bench.median_ratio(rounds, 0, 1) == 3.0  # ratios 2, 3, 5 (not 20 / 5 from the medians)
    assert bench.median_round(rounds, 0)["output_tok_s"] == 20
    assert bench.median_round(rounds[:2], 1)["output_tok_s"] == 5  # the lower of two
    assert bench.median_ratio(rounds[:2], 0, 1) == 2.0  # the lower of two as well, not their mean 2.5


def test_bench_workload_is_seeded():
    args = bench.parse_args(["--backend", "mock", "--num-seqs", "5"])
    a, b = bench.make_workload(args, 1024), bench.make_workload(args, 1024)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert all(32 <= len(p) <= 128 for p in a.prompts) and all(32 <= n <= 64 for n in a.output_lens)


@pytest.mark.parametrize("argv", [["--backend", "tpu"], ["--min-input-len", "9", "--max-input-len", "3"],
                                  ["--backend", "mock", "--compare", "hf"],
                                  ["--backend", "jax,mock", "--compare", "hf"], ["--rounds", "0"], ["--num-seqs", "0"],
                                  ["--num-seqs", "-3"], ["--max-num-seqs", "0"], ["--max-num-batched-tokens", "-1"],
                                  ["--block-size", "0"], ["--temperature", "-0.5"], ["--backend", "mock,mock"],
                                  ["--backend", "mock", "--random-weights", "qwen3-0.6b"], ["--json", "/"], ["--json", __file__ + "/out.json"],
                                  ["--json", "/proc/out.json"], ["--seed", "-1"], ["--seed", str(2**32 - 1), "--num-seqs", "2"],
                                  ["--min-input-len", str(10**10), "--max-input-len", str(10**10)],
                                  ["--num-seqs", str(10**12)], ["--model", "some/dir", "--random-weights", "qwen3-0.6b"]])
def test_bench_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "model path does not exist"), (["--random-weights", "qwen9-1t"], "unknown random"),
    (["--backend", "mock", "--min-input-len", "3000", "--max-input-len", "3000"], "exceeds max_model_len")])
def test_bench_names_a_missing_model_or_a_too_long_workload_without_a_traceback(argv, message):
    with pytest.raises(SystemExit, match=f"error: .*{message}"):
        bench.main(argv)


def test_bench_names_a_cache_it_cannot_write_without_a_traceback(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache dir should be")
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    with pytest.raises(SystemExit, match="error: .*cannot write the cache dir .*XDG_CACHE_HOME"):
        bench.main(["--random-weights", "qwen3-0.6b", "--backend", "onnx"])


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
def test_random_model_tensors_match_transformers(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**RANDOM_CONFIGS[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert tensor_shapes(RANDOM_CONFIGS[name]) == expected


def test_a_random_model_is_built_once_aside_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    from nanovllm_jax import random_models

    monkeypatch.setitem(random_models.RANDOM_CONFIGS, "tiny-qwen3", dict(
        RANDOM_CONFIGS["qwen3-0.6b"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=1024))
    out = random_models.build_random_model("tiny-qwen3", tmp_path / "random" / "tiny-qwen3")
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert random_models.build_random_model("tiny-qwen3", out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert [p.name for p in out.parent.iterdir()] == ["tiny-qwen3"]  # no scratch left
    (out / "tokenizer.json").unlink()
    with pytest.raises(OSError, match="is incomplete"):
        random_models.build_random_model("tiny-qwen3", out)
    (tmp_path / "blocked").write_text("a file where the cache dir should be")
    with pytest.raises(OSError, match="cannot write the cache dir .*blocked"):
        random_models.build_random_model("tiny-qwen3", tmp_path / "blocked" / "tiny-qwen3")


def test_bench_random_weights_against_transformers(tmp_path, monkeypatch):
    """--random-weights builds an architecture-shaped model once; --compare hf runs transformers on the
    same prompts, credited each request's own output length; the JSON holds speedup_vs_hf."""
    from nanovllm_jax import random_models

    tiny = dict(random_models.RANDOM_CONFIGS["qwen3-0.6b"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024,
                max_position_embeddings=512)
    monkeypatch.setitem(random_models.RANDOM_CONFIGS, "tiny-qwen3", tiny)
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "onnx"))
    out = tmp_path / "bench.json"
    argv = ["--random-weights", "tiny-qwen3", "--backend", "onnx", "--compare", "hf", "--num-seqs", "3",
            "--min-input-len", "4", "--max-input-len", "12", "--min-output-len", "2", "--max-output-len", "6"]
    bench.main(argv + ["--json", str(out)])
    workload = bench.make_workload(bench.parse_args(argv), 1024)
    result = json.loads(out.read_text())
    model_dir = tmp_path / "cache" / "random" / "tiny-qwen3"
    assert result["model"] == str(model_dir) and json.loads((model_dir / "config.json").read_text())["hidden_size"] == 64
    onnx, hf = result["runs"]
    assert (onnx["engine"], hf["engine"]) == ("nanovllm_jax[onnx]", "transformers")
    assert result["speedup_vs_hf"]["nanovllm_jax[onnx]"] == pytest.approx(onnx["output_tok_s"] / hf["output_tok_s"])
    for run in (onnx, hf):  # counted the same way
        assert run["output_tok_s"] * run["run_s"] == pytest.approx(workload.output_tokens)
    assert hf["tokens_generated_with_padding"] == 3 * max(workload.output_lens)
    assert hf["prompt_tokens_with_padding"] == 3 * max(map(len, workload.prompts))
    assert hf["device_held_mb"] is None  # transformers runs on the CPU, whatever device JAX has


def _tiny_random_model(tmp_path, monkeypatch):
    from nanovllm_jax import random_models

    monkeypatch.setitem(random_models.RANDOM_CONFIGS, "tiny-qwen3", dict(
        RANDOM_CONFIGS["qwen3-0.6b"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=1024, max_position_embeddings=512))
    return random_models.build_random_model("tiny-qwen3", tmp_path / "random" / "tiny-qwen3")


def test_transformers_samples_as_the_engines_whatever_the_models_generation_config_says(tmp_path, monkeypatch):
    """A generation_config.json's repetition_penalty, n-gram ban, min_p, top_k or extra return sequences
    would have transformers do other (or more) work than it is credited with."""
    from transformers.generation.utils import GenerationMixin

    model_dir = _tiny_random_model(tmp_path, monkeypatch)
    (model_dir / "generation_config.json").write_text(json.dumps(dict(
        eos_token_id=0, do_sample=True, top_k=20, repetition_penalty=1.3, no_repeat_ngram_size=2, min_p=0.05,
        num_return_sequences=2)))
    processors, shapes = [], []
    get_processors, generate = GenerationMixin._get_logits_processor, GenerationMixin.generate

    def spy_processors(self, *args, **kwargs):
        found = get_processors(self, *args, **kwargs)
        processors.extend(type(p).__name__ for p in found)
        return found

    def spy_generate(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", spy_processors)
    monkeypatch.setattr(GenerationMixin, "generate", spy_generate)
    args = bench.parse_args(["--backend", "onnx", "--num-seqs", "3", "--min-input-len", "4", "--max-input-len", "12",
                             "--min-output-len", "2", "--max-output-len", "6"])
    workload = bench.make_workload(args, 1024)
    run = bench.start_hf(str(model_dir), workload, args)()
    # temperature, and the minimum length that stands in for ignore_eos (min_new_tokens also sets a MinLength)
    assert set(processors) == {"TemperatureLogitsWarper", "MinNewTokensLengthLogitsProcessor", "MinLengthLogitsProcessor"}
    width, longest = max(map(len, workload.prompts)), max(workload.output_lens)
    assert shapes[-1] == (3, width + longest) and run["tokens_generated_with_padding"] == 3 * longest


def test_the_compile_counter_counts_without_jaxs_private_event_name(monkeypatch):
    """BACKEND_COMPILE_EVENT is private to jax: where it cannot be imported, the counter still counts
    (it counted nothing, and every run reported 0 compilations after warm-up)."""
    import sys

    import jax
    import numpy as np

    monkeypatch.setitem(sys.modules, "jax._src.dispatch", None)  # the import raises ImportError
    counter = bench.CompileCounter()
    jax.jit(lambda x: x * 3.25 - 1)(np.arange(7.0))  # a program compiled now
    assert counter.count >= 1 and counter.active


@pytest.mark.parametrize("platform, maxrss", [("linux", 300 * 1024), ("darwin", 300 * 2**20)])
def test_peak_rss_is_in_mb_where_getrusage_counts_kib_or_bytes(monkeypatch, platform, maxrss):
    import types

    monkeypatch.setattr(bench.sys, "platform", platform)
    monkeypatch.setattr(bench.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert bench.process_peak_rss_mb() == 300


def test_the_printed_report_shows_device_memory_and_the_ratio_between_backends(tmp_path, monkeypatch, capsys):
    run = dict(engine="nanovllm_jax[jax]", output_tok_s=100.0, total_tok_s=300.0, run_s=2.0, warmup_s=9.0,
               rss_held_mb=700.0, process_peak_rss_mb=1500.0, device_held_mb=1234.0, process_device_peak_mb=5678.0)
    line = bench.format_run(run)
    assert "1234 MB device" in line and "5678 MB" in line
    assert "device" not in bench.format_run(run | dict(device_held_mb=None, process_device_peak_mb=None))  # CPU
    model_dir = _tiny_random_model(tmp_path, monkeypatch)
    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "onnx"))
    result = bench.main(["--model", str(model_dir), "--backend", "mock,onnx", "--num-seqs", "2", "--min-input-len", "4",
                         "--max-input-len", "8", "--min-output-len", "2", "--max-output-len", "3"])
    (ratio,) = result["ratio_vs_first_backend"].values()
    assert f"throughput vs nanovllm_jax[mock]: nanovllm_jax[onnx] {ratio:.2f}x" in capsys.readouterr().out
