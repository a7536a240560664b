"""Gated MLP activations, act(gate) * up, as transformers computes them in any dtype: torch's silu and
gelu (F.silu, F.gelu: hidden_act "silu", "gelu_pytorch_tanh", "gelu") run in f32 and round the result
once to the activation dtype, then the product with up rounds again. JAX evaluates jax.nn.silu / gelu
op by op in the input dtype: in bf16 and f16 its error is ~1.6x torch's, 40% of the values differ
from transformers', and the negative tail (where 1 + tanh cancels) is biased."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def silu_and_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up


def gelu_and_mul(gate: jax.Array, up: jax.Array, approximate: bool) -> jax.Array:
    return jax.nn.gelu(gate.astype(jnp.float32), approximate=approximate).astype(gate.dtype) * up
