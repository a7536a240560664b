"""nanovllm_jax: a compact, fast LLM inference engine on JAX/XLA."""
from nanovllm_jax.llm import LLM
from nanovllm_jax.outputs import Logprob, RequestOutput, StreamDelta
from nanovllm_jax.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "StreamDelta", "Logprob"]
