"""Gemma 3 (text) as one pure function over a params pytree.

Differences from the Llama family: embeddings scaled by sqrt(hidden); four (1 + w) RMSNorms per layer
(the attention and MLP outputs are normalized before their residual adds); q/k RMSNorm; GeGLU with
the tanh gelu; attention scale query_pre_attn_scalar ** -0.5; and two kinds of layers (sliding-window
attention with a local RoPE base, full attention with the global base and its scaling). The kind is
per-layer data (a window and a RoPE-table index scanned alongside the weights), so one compiled
layer body serves all layers under lax.scan; unrolled (per-layer params, the fast form on XLA:CPU, see
llama.py) it is static. The KV cache is a carry that each layer scatters its new K/V into in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.layers.activation import gelu_and_mul
from nanovllm_jax.layers.attention import NO_WINDOW, paged_attention
from nanovllm_jax.layers.linear import linear
from nanovllm_jax.layers.norm import rms_norm
from nanovllm_jax.layers.rope import apply_rope, rope_angles, rope_inv_freq
from nanovllm_jax.models import ForwardInputs, config_parser, sliding_layers, sliding_window
from nanovllm_jax.models.llama import (GetTensor, check_head_groups, layer_stacker, output_head, projection_params,
                                       write_kv)

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")

# As vLLM does, float16 is refused: Gemma 3's residual stream outgrows its range (65504). The 270M's
# passes 1e5 by layer 8 (bf16 and f32 hold it), so every logit is NaN, in transformers' float16 too.
FLOAT16_UNSUPPORTED = "Gemma 3's activations outgrow float16's range: the 270M's logits come out all NaN"

_GELU = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}  # -> tanh approximation?


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]  # per layer: sliding (local) attention, else full (global)
    rope_local: tuple  # sorted rope-parameter items (rope_theta included), hashable for a jit static
    rope_global: tuple
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    attention_bias: bool
    gelu_tanh: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# transformers' Gemma3TextConfig defaults: multimodal checkpoints often store only the overrides.
_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=131_072,
    query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
)


@config_parser
def parse_config(hf: dict) -> Gemma3Config:
    """Read an HF config.json dict: Gemma3ForCausalLM, or the text part of Gemma3ForConditionalGeneration;
    transformers 4.x (rope_theta, rope_local_base_freq, rope_scaling) or 5.x (rope_parameters per layer type)."""
    multimodal = "text_config" in hf
    tie = hf.get("tie_word_embeddings", hf.get("text_config", {}).get("tie_word_embeddings", True))
    hf = {**_DEFAULTS, **hf.get("text_config", hf)}
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config field use_bidirectional_attention=true is unsupported (decoder-only serving)")
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    if act not in _GELU:
        raise ValueError(f"config field hidden_activation={act!r} is unsupported (supported: {', '.join(_GELU)})")
    # 4.x: every `sliding_window_pattern`-th layer is global
    sliding = sliding_layers(hf, lambda i: (i + 1) % hf["sliding_window_pattern"] != 0)

    # As transformers 5 reads them: 5.x's rope_parameters holds one dict per layer type; a 4.x rope_scaling
    # updates the full-attention layers' (default) dict; the thetas default to rope_theta / rope_local_base_freq.
    rope = hf.get("rope_parameters") or {}
    if set(rope) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"config field rope_parameters={rope!r} must hold one dict per layer type (full_attention, "
                         f"sliding_attention) for Gemma 3: transformers ignores other keys")
    rope_global = dict(rope.get("full_attention") or {"rope_type": "default"})
    rope_global.update(hf.get("rope_scaling") or {})
    rope_local = dict(rope.get("sliding_attention") or {"rope_type": "default"})
    rope_global.setdefault("rope_theta", hf["rope_theta"])
    rope_local.setdefault("rope_theta", hf["rope_local_base_freq"])
    for params in (rope_global, rope_local):
        if "rope_type" in params and params.get("type", params["rope_type"]) != params["rope_type"]:
            # e.g. a 4.x rope_scaling spelling its type "type": transformers 5 keeps the dict's rope_type, 4.x took it
            raise ValueError(f"config field rope_scaling / rope_parameters gives a Gemma 3 RoPE type={params['type']!r} "
                             f"beside rope_type={params['rope_type']!r} (transformers 5 keeps rope_type, 4.x took "
                             f"type): name it as rope_type")
        params.setdefault("rope_type", params.pop("type", "default"))  # 4.x spelled it "type"
        if params["rope_type"] == "llama3":  # its pretraining length, where the dict does not give one
            params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        rope_inv_freq(2, params["rope_theta"], params)  # fail on an unsupported type now, not at load

    # attn_logit_softcapping is ignored, as transformers does: Gemma 3 replaced Gemma 2's attention
    # soft cap with the q/k norms, and its configs carry the field only for compatibility. Likewise
    # transformers' Gemma3ForConditionalGeneration never applies final_logit_softcapping (null in every
    # released Gemma 3 anyway).
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    check_head_groups(heads, kv_heads)
    return Gemma3Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf["rms_norm_eps"]),
        max_position_embeddings=hf["max_position_embeddings"],
        sliding_window=sliding_window(hf, None),
        sliding_layers=sliding,
        rope_local=tuple(sorted(rope_local.items())),
        rope_global=tuple(sorted(rope_global.items())),
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        final_logit_softcapping=None if multimodal else hf.get("final_logit_softcapping"),
        tie_word_embeddings=bool(tie),
        attention_bias=bool(hf.get("attention_bias", False)),
        gelu_tanh=_GELU[act],
    )


# ---- weights: HF names -> params pytree, in this one place -----------------------------------

# Where the decoder lives: Gemma3ForCausalLM, Gemma3ForConditionalGeneration (transformers 5.x / 4.x save).
DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def load_params(cfg: Gemma3Config, get: GetTensor, has: Callable[[str], bool]) -> dict:
    """Host (numpy) params: projections as in llama.projection_params (an untied head stays [vocab,
    hidden]), per-layer tensors stacked on axis 0. Norm weights stay as stored (HF's w of 1 + w): the
    1 is added in f32 in the forward."""
    prefix = next((p for p in DECODER_PREFIXES if has(p + "embed_tokens.weight")), None)
    if prefix is None:
        raise ValueError(f"no Gemma 3 embedding table in the checkpoint (looked for "
                         f"{', '.join(p + 'embed_tokens.weight' for p in DECODER_PREFIXES)})")
    h, d = cfg.hidden_size, cfg.head_dim
    stack = layer_stacker(prefix, cfg.num_layers)
    layers = {
        "attn_norm": stack(lambda p: get(p + "input_layernorm.weight", (h,))),
        "attn_post_norm": stack(lambda p: get(p + "post_attention_layernorm.weight", (h,))),
        "mlp_norm": stack(lambda p: get(p + "pre_feedforward_layernorm.weight", (h,))),
        "mlp_post_norm": stack(lambda p: get(p + "post_feedforward_layernorm.weight", (h,))),
        "q_norm": stack(lambda p: get(p + "self_attn.q_norm.weight", (d,))),
        "k_norm": stack(lambda p: get(p + "self_attn.k_norm.weight", (d,))),
        **projection_params(stack, get, h, cfg.intermediate_size, cfg.q_size, cfg.kv_size,
                            cfg.attention_bias, cfg.attention_bias),
    }
    params = {
        "embed": get(prefix + "embed_tokens.weight", (cfg.vocab_size, h)),
        "norm": get(prefix + "norm.weight", (h,)),
        "layers": layers,
        # [2, head_dim / 2]: row 0 local (sliding layers), row 1 global; kept f32 by the loader ("rope*").
        "rope_inv_freq": np.stack([rope_inv_freq(d, float(dict(r)["rope_theta"]), dict(r))
                                   for r in (cfg.rope_local, cfg.rope_global)]),
    }
    head = output_head(cfg, get, has, lambda: params["embed"], LM_HEADS)
    if head is not None:
        params["lm_head"] = head
    return params


# ---- the forward pass ------------------------------------------------------------------------

def _norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: scale by (1 + w), with the 1 added in f32 (exact even for bf16 weights)."""
    return rms_norm(x, 1.0 + w.astype(jnp.float32), eps)


def forward(params: dict, k_cache: jax.Array, v_cache: jax.Array, inputs: ForwardInputs, cfg: Gemma3Config):
    """Run T new tokens; returns (f32 logits[S, vocab] at logits_indices, k_cache, v_cache)."""
    embed = params["embed"]
    # HF multiplies by sqrt(hidden) cast to the weight dtype (55.4256 becomes 55.5 in bf16).
    x = embed[inputs.input_ids] * jnp.asarray(cfg.hidden_size ** 0.5, embed.dtype)
    meta = inputs.attn
    t = x.shape[0]
    eps = cfg.rms_norm_eps
    scale = cfg.query_pre_attn_scalar ** -0.5
    cos, sin = rope_angles(meta.positions, params["rope_inv_freq"])  # [2, T, head_dim / 2]: local, global

    def layer_step(carry, w, window, rope_row):
        x, k_cache, v_cache, layer = carry
        h = _norm(x, w["attn_norm"], eps)
        qkv = linear(h, w["w_qkv"])
        if cfg.attention_bias:
            qkv = qkv + w["b_qkv"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = _norm(q.reshape(t, cfg.num_heads, cfg.head_dim), w["q_norm"], eps)
        k = _norm(k.reshape(t, cfg.num_kv_heads, cfg.head_dim), w["k_norm"], eps)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        angles = cos[rope_row], sin[rope_row]
        q, k = apply_rope(q, *angles), apply_rope(k, *angles)
        k_cache, v_cache = write_kv(k_cache, v_cache, layer, inputs.slot_mapping, k, v)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, scale=scale, layer=layer, sliding_window=window)
        o = linear(o.reshape(t, cfg.q_size), w["w_o"])
        if cfg.attention_bias:
            o = o + w["b_o"]
        x = x + _norm(o, w["attn_post_norm"], eps)
        h = _norm(x, w["mlp_norm"], eps)
        gate, up = jnp.split(linear(h, w["w_gate_up"]), 2, axis=-1)
        h = linear(gelu_and_mul(gate, up, cfg.gelu_tanh), w["w_down"])
        x = x + _norm(h, w["mlp_post_norm"], eps)
        return (x, k_cache, v_cache, layer + 1), None

    carry = (x, k_cache, v_cache, jnp.int32(0))  # the layer index in the carry: see llama.forward
    window = cfg.sliding_window
    if isinstance(params["layers"], (list, tuple)):  # per-layer arrays, unrolled: the kind is static
        step = jax.jit(layer_step, static_argnums=(2, 3))  # traced once per kind; XLA inlines the calls
        for sliding, w in zip(cfg.sliding_layers, params["layers"]):
            carry, _ = step(carry, w, window if sliding else None, 0 if sliding else 1)
    else:  # stacked on axis 0: lax.scan, the kind is per-layer data so one body serves every layer
        sliding = np.asarray(cfg.sliding_layers)
        per_layer = (
            jnp.asarray(np.where(sliding, window or NO_WINDOW, NO_WINDOW), jnp.int32),
            jnp.asarray(np.where(sliding, 0, 1), jnp.int32),  # row of rope_inv_freq
        )
        carry, _ = jax.lax.scan(lambda c, xs: layer_step(c, xs[0], *xs[1]), carry, (params["layers"], per_layer))
    x, k_cache, v_cache, _ = carry
    h = _norm(x[inputs.logits_indices], params["norm"], eps)
    logits = linear(h, params.get("lm_head", embed), jnp.float32)
    if cfg.final_logit_softcapping is not None:
        cap = cfg.final_logit_softcapping
        logits = cap * jnp.tanh(logits / cap)
    return logits, k_cache, v_cache
