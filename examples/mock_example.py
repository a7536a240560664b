"""The zero-setup backend: a deterministic fake model and the built-in SimpleBPE tokenizer.

Switching to a real model is one argument: LLM("/path/to/hf_model_dir") (backend "jax"),
or LLM("/path/to/hf_model_dir", backend="onnx").
"""
from nanovllm_jax import LLM, SamplingParams

llm = LLM(backend="mock", max_num_seqs=4, kvcache_block_size=16)
prompts = ["Continuous batching keeps the device busy", "Paged attention reads the cache by block table"]
outputs = llm.generate(prompts, SamplingParams(temperature=0.8, seed=0, max_tokens=24))
for prompt, out in zip(prompts, outputs):
    print(f"{prompt!r} -> {len(out.token_ids)} tokens ({out.finish_reason}): {out.text!r}")
bm = llm.engine.block_manager
print(f"prefix cache: {bm.prefix_hit_tokens}/{bm.prefix_query_tokens} prompt tokens served from cache")
