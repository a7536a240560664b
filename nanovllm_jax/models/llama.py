"""Llama-family decoders (Llama 2/3.x, Mistral, Qwen2, Qwen3) as one pure function over a params pytree.

The families differ only in small switches: Qwen2 adds q/k/v biases, Qwen3 RMS-normalizes q and k
per head, Llama 3.x rescales RoPE frequencies, Mistral (and Qwen with use_sliding_window) attends within
a sliding window. Layer weights come either stacked on a leading axis (run under lax.scan: ~4x faster
to compile) or as a list of per-layer dicts (unrolled: on XLA:CPU ~4x faster to run, since scan copies
each layer's weight slice before its matmul). The KV cache is a carry that each layer scatters its new
K/V into in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.layers.activation import silu_and_mul
from nanovllm_jax.layers.attention import NO_WINDOW, paged_attention
from nanovllm_jax.layers.linear import linear
from nanovllm_jax.layers.norm import rms_norm
from nanovllm_jax.layers.rope import apply_rope, rope_angles, rope_inv_freq
from nanovllm_jax.models import ForwardInputs, config_parser, sliding_layers, sliding_window

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: tuple | None  # sorted dict items, hashable so the config can be a jit static
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or attention_bias
    o_bias: bool  # attention_bias (Llama / Qwen3 option)
    qk_norm: bool  # Qwen3
    layer_windows: tuple[int | None, ...]  # per layer: keys within this many positions of the query, or all

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                "MistralForCausalLM": "mistral"}
_KV_HEADS_DEFAULT = {"qwen2": 32, "qwen3": 32, "mistral": 8}  # transformers' where the field is absent


def check_head_groups(heads: int, kv_heads: int) -> None:
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")


@config_parser
def parse_config(hf: dict) -> LlamaConfig:
    """Read an HF config.json dict (transformers 4.x or 5.x field names)."""
    # the family switches below key on model_type; a config without one (transformers' Qwen2ForCausalLM & co. load
    # it by class) is its architecture's
    model_type = hf.get("model_type") or next(
        (_MODEL_TYPES[a] for a in hf.get("architectures") or [] if a in _MODEL_TYPES), "")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config field hidden_act={hf['hidden_act']!r} is unsupported (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError("config field mlp_bias=true is unsupported")
    # As transformers 5 reads them: a legacy rope_scaling replaces rope_parameters, and the rope_theta inside
    # the dict in use wins over a top-level one; llama3 scaling's pretraining length is a top-level
    # original_max_position_embeddings (Phi-3 style), else the dict's, else max_position_embeddings.
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(scaling.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3" and "original_max_position_embeddings" in hf:
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    elif rope_type == "llama3" and "max_position_embeddings" in hf:
        scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    rope_inv_freq(2, theta, scaling)  # fail on an unsupported type or a missing key now, not at load
    heads = hf["num_attention_heads"]
    # fields a config may leave out take transformers' defaults for its family (null: the fallback)
    kv_heads = hf.get("num_key_value_heads", _KV_HEADS_DEFAULT.get(model_type)) or heads
    check_head_groups(heads, kv_heads)
    # attention_bias as transformers reads it: Llama and Qwen3 put it on q/k/v/o, Qwen2 always has q/k/v biases
    # and never an o bias, Mistral has none
    attention_bias = bool(hf.get("attention_bias", False)) and model_type not in ("qwen2", "mistral")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hf.get("head_dim", 128 if model_type == "qwen3" else None) or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=None if rope_type == "default" else tuple(sorted(scaling.items())),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        qk_norm=model_type == "qwen3",
        layer_windows=_layer_windows(hf, model_type),
    )


def _layer_windows(hf: dict, model_type: str) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers 5 reads the config."""
    if model_type == "mistral":  # no use_sliding_window flag: its window (4096 where absent) always applies
        window, is_sliding = sliding_window(hf, 4096), lambda i: True
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):  # from max_window_layers on
        window, is_sliding = sliding_window(hf, 4096), lambda i: i >= hf.get("max_window_layers", 28)
    else:
        window, is_sliding = None, lambda i: False
    return tuple(window if sliding else None for sliding in sliding_layers(hf, is_sliding))


# ---- weights: HF names -> params pytree, in this one place -----------------------------------

GetTensor = Callable[[str, tuple], np.ndarray]  # (hf name, expected HF shape) -> array in target dtype


def layer_stacker(prefix: str, num_layers: int) -> Callable:
    """stack(fn): fn(prefix of layer n's HF names) for every layer, stacked on a new axis 0."""
    def stack(fn: Callable[[str], np.ndarray]) -> np.ndarray:
        return np.stack([fn(f"{prefix}layers.{n}.") for n in range(num_layers)])
    return stack


def projection_params(stack: Callable, get: GetTensor, h: int, i: int, q: int, kv: int, qkv_bias: bool,
                      o_bias: bool) -> dict:
    """The attention and MLP projections, shared by every family here: weights [out, in] as HF stores
    them (see layers/linear.py), q/k/v and gate/up fused so each layer does two big matmuls instead of five."""
    params = {
        "w_qkv": stack(lambda p: np.concatenate([
            get(p + "self_attn.q_proj.weight", (q, h)),
            get(p + "self_attn.k_proj.weight", (kv, h)),
            get(p + "self_attn.v_proj.weight", (kv, h))])),
        "w_o": stack(lambda p: get(p + "self_attn.o_proj.weight", (h, q))),
        "w_gate_up": stack(lambda p: np.concatenate([
            get(p + "mlp.gate_proj.weight", (i, h)), get(p + "mlp.up_proj.weight", (i, h))])),
        "w_down": stack(lambda p: get(p + "mlp.down_proj.weight", (h, i))),
    }
    if qkv_bias:
        params["b_qkv"] = stack(lambda p: np.concatenate([
            get(p + "self_attn.q_proj.bias", (q,)), get(p + "self_attn.k_proj.bias", (kv,)),
            get(p + "self_attn.v_proj.bias", (kv,))]))
    if o_bias:
        params["b_o"] = stack(lambda p: get(p + "self_attn.o_proj.bias", (h,)))
    return params


def load_params(cfg: LlamaConfig, get: GetTensor, has: Callable[[str], bool]) -> dict:
    """Host (numpy) params: projections as in projection_params (an untied head stays [vocab, hidden]),
    per-layer tensors stacked on axis 0."""
    h = cfg.hidden_size
    stack = layer_stacker("model.", cfg.num_layers)
    layers = {
        "attn_norm": stack(lambda p: get(p + "input_layernorm.weight", (h,))),
        "mlp_norm": stack(lambda p: get(p + "post_attention_layernorm.weight", (h,))),
        **projection_params(stack, get, h, cfg.intermediate_size, cfg.q_size, cfg.kv_size,
                            cfg.qkv_bias, cfg.o_bias),
    }
    if cfg.qk_norm:
        layers["q_norm"] = stack(lambda p: get(p + "self_attn.q_norm.weight", (cfg.head_dim,)))
        layers["k_norm"] = stack(lambda p: get(p + "self_attn.k_norm.weight", (cfg.head_dim,)))
    params = {
        "embed": get("model.embed_tokens.weight", (cfg.vocab_size, h)),
        "norm": get("model.norm.weight", (h,)),
        "layers": layers,
        "rope_inv_freq": rope_inv_freq(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ())),
    }
    head = output_head(cfg, get, has, lambda: params["embed"])
    if head is not None:
        params["lm_head"] = head
    return params


def output_head(cfg, get: GetTensor, has: Callable[[str], bool], embed: Callable[[], np.ndarray],
                names: tuple[str, ...] = ("lm_head.weight",)) -> np.ndarray | None:
    """The untied head [V, H] as stored (like every linear weight), or None where the head is the embedding.

    As transformers 5 loads it, a tied config whose checkpoint also holds a head of other values is untied:
    that head is used (transformers warns that the config is wrong). An equal stored head is dropped; `embed`
    gives the embedding to compare, read only then."""
    name = next((n for n in names if has(n)), names[0])
    if cfg.tie_word_embeddings and not has(name):
        return None
    head = get(name, (cfg.vocab_size, cfg.hidden_size))
    return None if cfg.tie_word_embeddings and np.array_equal(head, embed()) else head


def random_params(cfg: LlamaConfig, dtype: str = "float32", seed: int = 0, std: float = 0.02,
                  stacked: bool = False) -> dict:
    """Random weights in the pytree layout, for benchmarks that need no checkpoint on disk."""
    from nanovllm_jax.loader import to_device
    from nanovllm_jax.random_models import random_weight

    rng = np.random.default_rng(seed)
    fake = lambda name, shape: random_weight(rng, name, shape, std)  # noqa: E731
    has = lambda name: name != "lm_head.weight"  # noqa: E731 - a tied config gets no head of its own
    return to_device(load_params(cfg, fake, has), str(jnp.dtype(dtype)), stacked=stacked)


# ---- the forward pass ------------------------------------------------------------------------

def write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, slots: jax.Array, k: jax.Array,
             v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's k/v[T, KV, D] into the stacked [L, KV, slots, D] caches in place.

    Attention must then read the updated buffers (reading the old ones would make XLA copy the whole
    cache every layer), and the barrier keeps XLA from fusing the update into those reads (with one
    token it turns the scatter into an update-slice that it fuses into a full-cache copy).
    """
    if slots.shape[0] == 1:  # XLA rewrites a one-row scatter as an update-slice that copies the cache
        slots = jnp.concatenate([slots, jnp.full((1,), k_cache.shape[2], slots.dtype)])  # a dropped row
        k, v = (jnp.concatenate([x, x]) for x in (k, v))
    layer = jnp.asarray(layer)  # an array index, so the indexed dims come first: [T, KV, D]
    k_cache = k_cache.at[layer, :, slots].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, :, slots].set(v.astype(v_cache.dtype), mode="drop")
    return jax.lax.optimization_barrier((k_cache, v_cache))


def forward(params: dict, k_cache: jax.Array, v_cache: jax.Array, inputs: ForwardInputs, cfg: LlamaConfig):
    """Run T new tokens; returns (f32 logits[S, vocab] at logits_indices, k_cache, v_cache)."""
    x = params["embed"][inputs.input_ids]
    meta = inputs.attn
    t = x.shape[0]
    scale = cfg.head_dim ** -0.5
    cos, sin = rope_angles(meta.positions, params["rope_inv_freq"])

    def layer_step(carry, w, window):
        x, k_cache, v_cache, layer = carry
        h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
        qkv = linear(h, w["w_qkv"])
        if cfg.qkv_bias:
            qkv = qkv + w["b_qkv"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = write_kv(k_cache, v_cache, layer, inputs.slot_mapping, k, v)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, scale=scale, layer=layer, sliding_window=window)
        o = linear(o.reshape(t, cfg.q_size), w["w_o"])
        if cfg.o_bias:
            o = o + w["b_o"]
        x = x + o
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
        gate, up = jnp.split(linear(h, w["w_gate_up"]), 2, axis=-1)
        x = x + linear(silu_and_mul(gate, up), w["w_down"])
        return (x, k_cache, v_cache, layer + 1), None

    # The layer index rides in the carry: scanned as data, each layer would slice it out of an array
    # (one more kernel per layer on a GPU). Unrolled, XLA folds it to constants.
    carry = (x, k_cache, v_cache, jnp.int32(0))
    windows = cfg.layer_windows
    if isinstance(params["layers"], (list, tuple)):  # per-layer arrays, unrolled (see loader.to_device)
        step = jax.jit(layer_step, static_argnums=2)  # traced once per window; XLA inlines the calls
        for w, window in zip(params["layers"], windows):
            carry, _ = step(carry, w, window)
    elif len(set(windows)) == 1:  # stacked on axis 0: lax.scan, ~4x faster to compile
        carry, _ = jax.lax.scan(lambda c, w: layer_step(c, w, windows[0]), carry, params["layers"])
    else:  # layers of both kinds (Qwen's use_sliding_window): the window is per-layer data
        per_layer = jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)
        carry, _ = jax.lax.scan(lambda c, xs: layer_step(c, *xs), carry, (params["layers"], per_layer))
    x, k_cache, v_cache, _ = carry
    h = rms_norm(x[inputs.logits_indices], params["norm"], cfg.rms_norm_eps)
    logits = linear(h, params.get("lm_head", params["embed"]), jnp.float32)
    return logits, k_cache, v_cache
