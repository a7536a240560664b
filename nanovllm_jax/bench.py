"""python -m nanovllm_jax.bench: nano-vllm's throughput benchmark, with transformers side by side.

N requests of random token ids and random lengths (fixed seed), temperature 0.6, ignore_eos.
Throughput = output tokens / wall time of one run after warm-up; latencies come from the streaming
API (every request arrives at t=0, as in an offline batch). All engines load and warm up first, then
each runs the workload in turn, --rounds times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nanovllm_jax.config import EngineConfig, read_json_object, text_config_of
from nanovllm_jax.disk_cache import cache_home
from nanovllm_jax.sampling_params import SamplingParams

CACHE = cache_home()
MAX_WORKLOAD_TOKENS = 1 << 26  # a sanity bound on the workload's size, checked before it is built


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = np.random.default_rng(args.seed)
    high = min(vocab_size, 10000)
    prompts = [
        rng.integers(1, high, size=int(rng.integers(args.min_input_len, args.max_input_len + 1))).tolist()
        for _ in range(args.num_seqs)
    ]
    output_lens = rng.integers(args.min_output_len, args.max_output_len + 1, size=args.num_seqs).tolist()
    return Workload(prompts, output_lens)


class CompileCounter:
    """Counts XLA backend compilations (JAX's monitoring event); a run reports how many happened during it."""

    def __init__(self):
        self.count = 0
        self.active = False  # listening: otherwise a run reports no count (None), not a count of 0
        try:
            import jax.monitoring
        except ImportError:
            return
        try:
            from jax._src.dispatch import BACKEND_COMPILE_EVENT
        except ImportError:  # a private name another jax may move: the event itself keeps its name
            BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

        def on_event(event: str, duration: float, **kwargs) -> None:
            if event == BACKEND_COMPILE_EVENT:
                self.count += 1

        jax.monitoring.register_event_duration_secs_listener(on_event)
        self.active = True


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:  # e.g. TPOT when every request makes one token
        return {"p50": None, "p99": None}
    arr = np.asarray(values) * scale
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def process_peak_rss_mb() -> float:
    """The process's peak so far: every engine loaded before it counts (see rss_held_mb)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return None


def device_mb(stat: str) -> float | None:
    """A JAX device memory stat (bytes_in_use, peak_bytes_in_use) in MB; None on CPU."""
    try:
        import jax

        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - no device stats (CPU): report None
        return None
    return stats[stat] / 2**20 if stats and stat in stats else None


class Held:
    """Host and device memory that loading an engine added: per engine, where process peaks are not."""

    def __init__(self):
        self.rss, self.device = rss_mb(), device_mb("bytes_in_use")

    def report(self) -> dict:
        rss, device = rss_mb(), device_mb("bytes_in_use")
        return {"rss_held_mb": None if rss is None else rss - self.rss,
                "device_held_mb": None if device is None else device - self.device}


Run = Callable[[], dict]  # one timed pass of the workload through an already warmed-up engine


def start_engine(backend: str, model: str | None, workload: Workload, args, counter: CompileCounter) -> Run:
    from nanovllm_jax import LLM

    held, start = Held(), time.perf_counter()
    llm = LLM(model, backend=backend, **engine_kwargs(args))
    compile_s = getattr(llm.engine.runner, "warmup_seconds", 0.0)  # the runner compiles as it loads
    load_s = time.perf_counter() - start - compile_s
    params = [
        SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n, seed=args.seed + i)
        for i, n in enumerate(workload.output_lens)
    ]
    for prompt, p in zip(workload.prompts, params):  # e.g. too long for max_model_len: before any run
        llm.engine.validate(prompt, p)
    warm = time.perf_counter()
    llm.generate([workload.prompts[0][:8]], SamplingParams(max_tokens=4), use_tqdm=False)
    warmup_s = time.perf_counter() - warm + compile_s
    memory = held.report()

    def run() -> dict:
        if not llm.reset_prefix_cache():  # every round prefills its prompts, as the first did
            raise RuntimeError("requests still running: cannot reset the prefix cache")
        compiles = counter.count
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        gaps: list[float] = []
        produced = 0
        loadavg, t0 = os.getloadavg()[0], time.perf_counter()
        for delta in llm.stream(workload.prompts, params):
            now = time.perf_counter()
            if not delta.token_ids:
                continue
            produced += len(delta.token_ids)
            if delta.index in last:
                gaps.append((now - last[delta.index]) / len(delta.token_ids))
            else:
                first[delta.index] = now - t0
            last[delta.index] = now
        wall = time.perf_counter() - t0
        assert produced == workload.output_tokens, f"{backend} produced {produced} tokens, expected {workload.output_tokens}"
        tpot = [(last[i] - t0 - first[i]) / (n - 1) for i, n in enumerate(workload.output_lens) if n > 1]
        return {
            "engine": f"nanovllm_jax[{backend}]",
            "output_tok_s": workload.output_tokens / wall,
            "total_tok_s": (workload.output_tokens + workload.input_tokens) / wall,
            "run_s": wall,
            "load_s": load_s,
            "warmup_s": warmup_s,
            "ttft_ms": percentiles(list(first.values())),
            "tpot_ms": percentiles(tpot),
            "itl_ms": percentiles(gaps),
            # only the JAX backend compiles (ONNX Runtime plans each new shape without a compile step)
            "compilations_after_warmup": counter.count - compiles if backend == "jax" and counter.active else None,
            **memory,
            "process_peak_rss_mb": process_peak_rss_mb(),
            "process_device_peak_mb": device_mb("peak_bytes_in_use"),
            "loadavg_1m": loadavg,
        }

    return run


def start_hf(model_dir: str, workload: Workload, args) -> Run:
    """transformers, batched as a user of `generate` would: one left-padded batch, f32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    held, start = Held(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    # generate() fills every setting it is not given from the model's generation_config.json (a
    # repetition_penalty, min_p, no_repeat_ngram_size, num_beams, num_return_sequences ...): keep only
    # the special tokens, so transformers samples as the engines do (temperature only).
    special = {k: getattr(model.generation_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**special)
    width = max(map(len, workload.prompts))
    ids = torch.zeros((len(workload.prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(workload.prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    new_tokens = max(workload.output_lens)
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature or None, top_k=None, top_p=None,
                    min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    torch.manual_seed(args.seed)
    warm = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], **(sampling | dict(min_new_tokens=4, max_new_tokens=4)))
    warmup_s = time.perf_counter() - warm
    memory = held.report() | {"device_held_mb": None}  # it runs on the CPU: the JAX device's memory is not its

    def run() -> dict:
        loadavg, t0 = os.getloadavg()[0], time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **sampling)
        wall = time.perf_counter() - t0
        # the work it is credited with (each row to the longest output), as the engines' token count is checked
        if tuple(out.shape) != (ids.shape[0], width + new_tokens):
            raise RuntimeError(f"transformers returned {tuple(out.shape)}, not the {ids.shape[0]} rows of "
                               f"{width + new_tokens} tokens it is credited with")
        # Counted the same way: each request's own max_tokens, though one batched generate runs every
        # row to the longest and prefills the padding (the work it did is reported beside).
        return {
            "engine": "transformers",
            "output_tok_s": workload.output_tokens / wall,
            "total_tok_s": (workload.output_tokens + workload.input_tokens) / wall,
            "run_s": wall,
            "load_s": load_s,
            "warmup_s": warmup_s,
            "tokens_generated_with_padding": int(ids.shape[0]) * new_tokens,
            "prompt_tokens_with_padding": int(ids.numel()),
            **memory,
            "process_peak_rss_mb": process_peak_rss_mb(),
            "loadavg_1m": loadavg,
            "torch": torch.__version__,
        }

    return run


def median_round(rounds: list[list[dict]], engine: int) -> dict:
    """The engine's run from the round where its throughput was the median (the lower one of two)."""
    ranked = sorted((r[engine] for r in rounds), key=lambda run: run["output_tok_s"])
    return ranked[(len(ranked) - 1) // 2]


def median_ratio(rounds: list[list[dict]], engine: int, base: int) -> float:
    """Median over rounds of engine / base throughput, each ratio from one round (the same machine state);
    the lower one of two, as in `median_round`."""
    ratios = sorted(r[engine]["output_tok_s"] / r[base]["output_tok_s"] for r in rounds)
    return ratios[(len(ratios) - 1) // 2]


def engine_kwargs(args) -> dict:
    kwargs = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kvcache_block_size=args.block_size)
    return {k: v for k, v in kwargs.items() if v is not None}


def resolve_model(args) -> str | None:
    if args.random_weights:
        from nanovllm_jax.random_models import build_random_model

        return str(build_random_model(args.random_weights, CACHE / "random" / args.random_weights))
    if args.model is None and args.backend == ["mock"]:
        return None
    from nanovllm_jax.default_model import resolve_model as resolve

    return str(resolve(args.model))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanovllm_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model dir or .gguf file (default: the embedded Gemma 3 270M)")
    p.add_argument("--random-weights", metavar="CONFIG_NAME",
                   help="an architecture-shaped random model built locally instead of --model: "
                        "qwen3-0.6b, qwen2-0.5b or llama-3.2-1b")
    p.add_argument("--backend", default="jax", type=lambda s: s.split(","),
                   help="jax, onnx or mock; a comma list (e.g. jax,onnx) runs each in turn (default: jax)")
    p.add_argument("--num-seqs", type=int, default=16, help="number of requests (default: 16)")
    p.add_argument("--min-input-len", type=int, default=32, help="shortest prompt in tokens (default: 32)")
    p.add_argument("--max-input-len", type=int, default=128, help="longest prompt in tokens (default: 128)")
    p.add_argument("--min-output-len", type=int, default=32, help="fewest output tokens (default: 32)")
    p.add_argument("--max-output-len", type=int, default=64, help="most output tokens (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="workload and sampling seed (default: 0)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default: 0.6)")
    p.add_argument("--compare", choices=["hf"], help="also run transformers on the same workload")
    p.add_argument("--max-num-seqs", type=int, help="engine max_num_seqs (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=int, help="engine token budget per step (default: the engine's)")
    p.add_argument("--block-size", type=int, help="KV cache block size (default: the engine's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times, in turn, and report each engine's median round and "
                        "the median of the per-round speedups (steadier on a shared machine; default: 1)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = p.parse_args(argv)
    for backend in args.backend:
        if backend not in ("jax", "onnx", "mock"):
            p.error(f"unknown backend {backend!r}: choose jax, onnx or mock")
    if len(set(args.backend)) < len(args.backend):
        p.error("--backend names an engine twice")
    if args.random_weights and args.model:
        p.error("--random-weights builds the model it runs: it cannot take --model as well")
    if args.random_weights and "mock" in args.backend:
        p.error("the mock backend runs its own toy model: --random-weights needs jax or onnx")
    if args.num_seqs < 1:
        p.error("--num-seqs must be >= 1")
    if args.min_input_len < 1 or args.min_input_len > args.max_input_len:
        p.error(f"need 1 <= --min-input-len ({args.min_input_len}) <= --max-input-len ({args.max_input_len})")
    if args.min_output_len < 1 or args.min_output_len > args.max_output_len:
        p.error(f"need 1 <= --min-output-len ({args.min_output_len}) <= --max-output-len ({args.max_output_len})")
    if args.num_seqs * (args.max_input_len + args.max_output_len) > MAX_WORKLOAD_TOKENS:
        p.error(f"--num-seqs x (--max-input-len + --max-output-len) exceeds {MAX_WORKLOAD_TOKENS} tokens")
    if args.seed < 0 or args.seed + args.num_seqs > 2**32:
        p.error(f"--seed must be in [0, 2**32 - --num-seqs] (request i samples with seed + i), got {args.seed}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.compare and "mock" in args.backend:  # a toy model's speed against transformers' means nothing
        p.error("--compare hf compares real models: the mock backend runs a toy one (leave it out)")
    try:  # the engine's and the sampler's own checks, as usage errors before any model loads
        EngineConfig.from_kwargs(None, "mock", **engine_kwargs(args))
        SamplingParams(temperature=args.temperature)
    except ValueError as e:
        p.error(str(e))
    if args.json and not _writable_file_path(Path(args.json)):
        p.error(f"--json {args.json}: not a writable file path")
    return args


def _writable_file_path(path: Path) -> bool:
    """Whether a file can be written at `path` (tried now, so a run's results are not lost at its end);
    creates its missing parent dirs."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError:
        return False
    if not existed:
        path.unlink()
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    counter = CompileCounter()
    try:  # a model that does not exist, a workload too long for it, a cache it cannot write: no traceback
        model = resolve_model(args)
        workload = make_workload(args, _vocab_size(model))
        print(f"workload: {args.num_seqs} seqs, {workload.input_tokens} input + {workload.output_tokens} output tokens")
        runners = [start_engine(backend, model, workload, args, counter) for backend in args.backend]
    except (ValueError, OSError) as e:
        sys.exit(f"python -m nanovllm_jax.bench: error: {e}")
    if args.compare == "hf":
        runners.append(start_hf(model, workload, args))
    rounds = []
    for n in range(args.rounds):
        if args.rounds > 1:
            print(f"round {n + 1}/{args.rounds}")
        rounds.append([])
        for run in runners:
            rounds[-1].append(run())
            print(format_run(rounds[-1][-1]))
    runs = [median_round(rounds, i) for i in range(len(runners))]
    if args.rounds > 1:
        print(f"median round per engine ({args.rounds} rounds):\n" + "\n".join(map(format_run, runs)))
    result = {
        "command": "python -m nanovllm_jax.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": _cpus(),
                    "device": _device()},
        "model": model or "mock",
        "model_name": args.random_weights or args.model or ("mock" if model is None else "embedded Gemma 3 270M"),
        "workload": {k: getattr(args, k) for k in ("num_seqs", "min_input_len", "max_input_len", "min_output_len",
                                                   "max_output_len", "seed", "temperature")}
                    | {"input_tokens": workload.input_tokens, "output_tokens": workload.output_tokens},
        "rounds": args.rounds,
        "runs": runs,
    }
    if args.rounds > 1:
        result["all_rounds"] = rounds
    engines = range(len(args.backend))
    if args.compare == "hf":
        result["speedup_vs_hf"] = {runs[i]["engine"]: median_ratio(rounds, i, len(runners) - 1) for i in engines}
        print("speedup vs transformers: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup_vs_hf"].items()))
    if len(args.backend) > 1:
        result["ratio_vs_first_backend"] = {runs[i]["engine"]: median_ratio(rounds, i, 0) for i in engines[1:]}
        print(f"throughput vs {runs[0]['engine']}: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratio_vs_first_backend"].items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def format_run(run: dict) -> str:
    held = "" if run["rss_held_mb"] is None else f"holds {run['rss_held_mb']:.0f} MB RSS (process peak "
    line = (f"{run['engine']:>22}: {run['output_tok_s']:8.1f} output tok/s  {run['total_tok_s']:8.1f} total tok/s  "
            f"run {run['run_s']:.1f}s  warm-up {run['warmup_s']:.1f}s  {held}"
            f"{run['process_peak_rss_mb']:.0f} MB{')' if held else ' peak RSS'}")
    if run.get("device_held_mb") is not None:  # a device with memory stats (a GPU): not on CPU
        peak = run.get("process_device_peak_mb")
        line += f"  holds {run['device_held_mb']:.0f} MB device memory"
        line += "" if peak is None else f" (process peak {peak:.0f} MB)"
    if "ttft_ms" in run:
        line += (f"\n{'':>24}TTFT p50/p99 {_ms(run['ttft_ms'], 0)} ms  TPOT p50/p99 {_ms(run['tpot_ms'], 1)} ms  "
                 f"ITL p50/p99 {_ms(run['itl_ms'], 1)} ms")
        if run["compilations_after_warmup"] is not None:
            line += f"  compilations after warm-up: {run['compilations_after_warmup']}"
    return line


def _ms(p: dict, digits: int) -> str:
    return "/".join("-" if p[k] is None else f"{p[k]:.{digits}f}" for k in ("p50", "p99"))


def _vocab_size(model: str | None) -> int:
    if model is None:
        return 1024
    path = Path(model) / "config.json"
    config = read_json_object(path)
    return config.get("vocab_size") or text_config_of(config, path).get("vocab_size", 1024)


def _cpu_model() -> str:
    """The CPU's name (platform.processor() is empty on Linux): speedups differ between CPU models."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _device() -> str:
    try:
        import jax

        return str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    main()
