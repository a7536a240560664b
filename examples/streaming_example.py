"""Tokens and text as they are produced, for several prompts at once."""
import sys

from nanovllm_jax import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else None
llm = LLM(model, backend="mock" if model is None else "jax")
prompts = ["Once upon a time", "The capital of France is"]
for delta in llm.stream(prompts, SamplingParams(temperature=0.0, max_tokens=32)):
    print(f"[{delta.index}] {delta.text!r}" + (f" <{delta.finish_reason}>" if delta.finished else ""))
