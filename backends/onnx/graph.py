"""The decoder as one ONNX graph over a paged KV cache (Llama / Qwen2 / Qwen3 / Gemma 3 text).

Inputs (T new tokens of S sequences; Q = longest query of the step; G = query heads per KV head):
  input_ids, positions   i64[T]
  q_index                i64[S, Q]      flat token index of each sequence's j-th new token (padding: 0)
  out_index              i64[T]         row of each token in the flattened [S*Q] attention output
  block_ids              i64[S, B]      the blocks holding each sequence's cached context (padding: 0)
  attn_bias              f32[1, S, Q*G, B*bs + Q]  0 where query row q*G+g may attend a key, else -1e30;
                                        keys are the B*bs cached columns, then this step's Q rows
  attn_bias_local        like attn_bias, cut to the last sliding_window positions (models with sliding layers only)
  logits_indices         i64[S]
  k_cache, v_cache       f32[L, KVH, num_blocks, bs, D]  read-only here: the runner owns and writes them
Outputs:
  logits                 f32[S, V]
  new_k, new_v           f32[L, T, KVH, D]  this step's K (after norm and RoPE) and V rows

Attention reads each sequence's cached blocks with one gather per layer (no copy of the whole cache)
in a head-major layout that the score matmul consumes as is, and scores this step's own rows
separately; one softmax spans both, so the new rows never have to be written into the cache first.
The runner writes new_k/new_v into its cache after the step. The G query heads of one KV head are
folded into the query-row axis, so GQA needs no K/V repeat.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from backends.onnx.model_spec import ModelSpec
from backends.onnx.weight_writer import WeightWriter
from backends.onnx.weights import SafetensorsDir, embedding, final_norm, layer_weights, lm_head
from nanovllm_jax.layers.rope import rope_inv_freq

OPSET = 23  # RMSNormalization (23), Gelu (20)
MASKED = -1e30  # finite, so that an all-masked padding row stays NaN-free



class _Builder:
    """Appends nodes with fresh output names; small constants live inline, weights go to the writer."""

    def __init__(self, writer: WeightWriter, spec: ModelSpec):
        self.writer = writer
        self.spec = spec
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[TensorProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        names = [f"{op_type.lower()}_{self._n}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"n{self._n}", **attrs))
        return names if outputs > 1 else names[0]

    def const(self, value, dtype=np.int64) -> str:
        name = f"const_{len(self.consts)}"
        self.consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.writer.add(name, array.astype(np.float32))

    def linear(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        inputs = [x, self.weight(name + ".weight", w)]
        if bias is not None:
            inputs.append(self.weight(name + ".bias", bias))
        return self.op("Gemm", *inputs, transB=1)  # HF [out, in] layout as is

    def rms_norm(self, x: str, w: np.ndarray | None, name: str) -> str:
        if w is None:
            return x
        w = w + np.float32(self.spec.norm_offset)  # Gemma's (1 + w), folded in at export
        return self.op("RMSNormalization", x, self.weight(name, w), axis=-1, epsilon=self.spec.rms_norm_eps)

    def gated_mlp(self, x: str, lw: dict, pre: str) -> str:
        gate, up = self.op("Split", self.linear(x, lw["gate_up"], pre + "gate_up"), axis=-1, num_outputs=2, outputs=2)
        if self.spec.activation == "gelu_tanh":  # GeGLU
            act = self.op("Gelu", gate, approximate="tanh")
        else:  # SwiGLU
            act = self.op("Mul", gate, self.op("Sigmoid", gate))
        return self.linear(self.op("Mul", act, up), lw["down"], pre + "down")


def build_graph(spec: ModelSpec, weights: SafetensorsDir, writer: WeightWriter) -> onnx.ModelProto:
    b = _Builder(writer, spec)
    kvh, d = spec.num_kv_heads, spec.head_dim
    embed = b.weight("embed_tokens", _checked("embed_tokens", embedding(weights), (spec.vocab_size, spec.hidden_size)))

    x = b.op("Gather", embed, "input_ids", axis=0)  # [T, hidden]
    if spec.embed_scale != 1.0:
        x = b.op("Mul", x, b.const(spec.embed_scale, np.float32))
    rope = {"full": _rope_tables(b, spec.rope, d)}
    if spec.has_sliding_layers:
        rope["sliding"] = _rope_tables(b, spec.rope_local, d)
    blocks = _BlockReader(b, kvh, d)
    new_k, new_v = [], []
    for i in range(spec.num_layers):
        lw = layer_weights(weights, i, spec)
        _check_layer_shapes(spec, lw, i)
        pre = f"layers.{i}."
        kind = "sliding" if spec.is_sliding(i) else "full"
        h = b.rms_norm(x, lw["attn_in_norm"], pre + "attn_in_norm")
        qkv = b.linear(h, lw["qkv"], pre + "qkv", lw["qkv_bias"])
        sizes = b.const([spec.num_heads * d, kvh * d, kvh * d])
        q, k, v = b.op("Split", qkv, sizes, axis=-1, outputs=3)
        q = b.op("Reshape", q, b.const([-1, spec.num_heads, d]))
        k = b.op("Reshape", k, b.const([-1, kvh, d]))
        v = b.op("Reshape", v, b.const([-1, kvh, d]))
        # Qwen3 / Gemma 3: per-head RMSNorm before RoPE
        q, k = b.rms_norm(q, lw["q_norm"], pre + "q_norm"), b.rms_norm(k, lw["k_norm"], pre + "k_norm")
        q, k = _rope(b, q, *rope[kind]), _rope(b, k, *rope[kind])
        new_k.append(b.op("Unsqueeze", k, b.const([0])))
        new_v.append(b.op("Unsqueeze", v, b.const([0])))
        bias = "attn_bias_local" if kind == "sliding" and spec.has_local_mask else "attn_bias"
        o = _paged_attention(b, spec, q, k, v, *blocks.read(i), bias)
        o = b.rms_norm(b.linear(o, lw["o"], pre + "o", lw["o_bias"]), lw["attn_out_norm"], pre + "attn_out_norm")
        x = b.op("Add", x, o)
        h = b.rms_norm(x, lw["mlp_in_norm"], pre + "mlp_in_norm")
        x = b.op("Add", x, b.rms_norm(b.gated_mlp(h, lw, pre), lw["mlp_out_norm"], pre + "mlp_out_norm"))

    last = b.op("Gather", x, "logits_indices", axis=0)  # only the S rows that get sampled
    last = b.rms_norm(last, final_norm(weights), "final_norm")
    head = lm_head(weights, spec)
    if head is not None:
        _checked("lm_head", head, (spec.vocab_size, spec.hidden_size))
    head_name = embed if head is None else b.weight("lm_head", head)
    b.nodes.append(helper.make_node("Gemm", [last, head_name], ["logits"], name="lm_head", transB=1))
    b.nodes.append(helper.make_node("Concat", new_k, ["new_k"], name="concat_new_k", axis=0))
    b.nodes.append(helper.make_node("Concat", new_v, ["new_v"], name="concat_new_v", axis=0))
    return _model(b, spec)


def _checked(name: str, array: np.ndarray, shape: tuple) -> np.ndarray:
    """The checkpoint's tensor, if config.json gives its shape (as the JAX loader checks): else the export
    would fail at load or at the first step, far from the cause."""
    if array.shape != shape:
        raise ValueError(f"checkpoint tensor {name} has shape {array.shape}, expected {shape} from config.json")
    return array


def _check_layer_shapes(spec: ModelSpec, lw: dict[str, np.ndarray], layer: int) -> None:
    hidden, ffn = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    for name, shape in (("qkv", (q + 2 * kv, hidden)), ("o", (hidden, q)), ("gate_up", (2 * ffn, hidden)),
                        ("down", (hidden, ffn))):
        _checked(f"layer {layer} {name}", lw[name], shape)


def _rope_tables(b: _Builder, rope: dict, head_dim: int) -> tuple[str, str]:
    """cos/sin [T, 1, D/2] from positions, as transformers computes them (f32 position × inv_freq)."""
    pos = b.op("Unsqueeze", b.op("Cast", "positions", to=TensorProto.FLOAT), b.const([1]))  # [T, 1]
    freqs = b.op("Mul", pos, b.const(rope_inv_freq(head_dim, rope["rope_theta"], rope), np.float32))  # [T, D/2]
    freqs = b.op("Unsqueeze", freqs, b.const([1]))
    return b.op("Cos", freqs), b.op("Sin", freqs)


def _rope(b: _Builder, x: str, cos: str, sin: str) -> str:
    """Rotate-half RoPE on [T, heads, D]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = b.op("Split", x, axis=-1, num_outputs=2, outputs=2)
    first = b.op("Sub", b.op("Mul", x1, cos), b.op("Mul", x2, sin))
    second = b.op("Add", b.op("Mul", x2, cos), b.op("Mul", x1, sin))
    return b.op("Concat", first, second, axis=-1)


class _BlockReader:
    """Gathers, per layer, the cached blocks of every sequence as [KVH, S, B*bs, D]: whole blocks, so
    each gathered row is a contiguous bs*D run of the cache."""

    def __init__(self, b: _Builder, kvh: int, head_dim: int):
        self.b = b
        self.shape = b.const([0, 0, -1, head_dim])  # [KVH, S, B, bs, D] -> [KVH, S, B*bs, D]
        cache_shape = b.op("Shape", "k_cache")  # [L, KVH, num_blocks, bs, D]
        rows = b.op("Concat", b.const([-1]), b.op("Slice", cache_shape, b.const([3]), b.const([5])), axis=0)
        self.k_rows = b.op("Reshape", "k_cache", rows)  # [L*KVH*num_blocks, bs, D], a view
        self.v_rows = b.op("Reshape", "v_cache", rows)
        num_blocks = b.op("Slice", cache_shape, b.const([2]), b.const([3]))
        self.head_rows = b.op("Mul", b.const(np.arange(kvh).reshape(kvh, 1, 1)), num_blocks)  # [KVH, 1, 1]
        self.layer_rows = b.op("Mul", num_blocks, b.const([kvh]))  # rows per layer

    def read(self, layer: int) -> tuple[str, str]:
        b = self.b
        base = b.op("Add", self.head_rows, b.op("Mul", self.layer_rows, b.const([layer])))
        index = b.op("Add", base, "block_ids")  # [KVH, S, B]
        k = b.op("Reshape", b.op("Gather", self.k_rows, index, axis=0), self.shape)
        v = b.op("Reshape", b.op("Gather", self.v_rows, index, axis=0), self.shape)
        return k, v  # [KVH, S, B*bs, D]


def _paged_attention(b: _Builder, spec: ModelSpec, q: str, k: str, v: str, k_ctx: str, v_ctx: str, bias: str) -> str:
    """Attention of each sequence's new tokens over its cached blocks plus its own new rows; [T, H*D]."""
    kvh, g, d = spec.num_kv_heads, spec.group_size, spec.head_dim
    q = b.op("Mul", q, b.const(spec.attn_scale or 1.0 / np.sqrt(d), np.float32))
    q = b.op("Gather", b.op("Reshape", q, b.const([-1, kvh, g, d])), "q_index", axis=0)  # [S, Q, KVH, G, D]
    q = b.op("Reshape", b.op("Transpose", q, perm=[2, 0, 1, 3, 4]), b.const([0, 0, -1, d]))  # [KVH, S, Q*G, D]
    k_new = b.op("Transpose", b.op("Gather", k, "q_index", axis=0), perm=[2, 0, 3, 1])  # [KVH, S, D, Q]
    v_new = b.op("Transpose", b.op("Gather", v, "q_index", axis=0), perm=[2, 0, 1, 3])  # [KVH, S, Q, D]
    scores_ctx = b.op("MatMul", q, b.op("Transpose", k_ctx, perm=[0, 1, 3, 2]))  # fused to a transB matmul
    scores = b.op("Concat", scores_ctx, b.op("MatMul", q, k_new), axis=-1)  # [KVH, S, Q*G, B*bs + Q]
    probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)
    split = b.op("Concat", b.op("Shape", k_ctx, start=2, end=3), b.op("Shape", "q_index", start=1, end=2), axis=0)
    p_ctx, p_new = b.op("Split", probs, split, axis=-1, outputs=2)
    out = b.op("Add", b.op("MatMul", p_ctx, v_ctx), b.op("MatMul", p_new, v_new))  # [KVH, S, Q*G, D]
    out = b.op("Transpose", b.op("Reshape", out, b.const([0, 0, -1, g, d])), perm=[1, 2, 0, 3, 4])  # [S, Q, KVH, G, D]
    out = b.op("Reshape", out, b.const([-1, spec.num_heads * d]))  # [S*Q, H*D]
    return b.op("Gather", out, "out_index", axis=0)


def _model(b: _Builder, spec: ModelSpec) -> onnx.ModelProto:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = [spec.num_layers, spec.num_kv_heads, "num_blocks", "block_size", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["T"]),
        helper.make_tensor_value_info("positions", i64, ["T"]),
        helper.make_tensor_value_info("q_index", i64, ["S", "Q"]),
        helper.make_tensor_value_info("out_index", i64, ["T"]),
        helper.make_tensor_value_info("block_ids", i64, ["S", "B"]),
        helper.make_tensor_value_info("attn_bias", f, [1, "S", "QG", "C"]),
        helper.make_tensor_value_info("logits_indices", i64, ["S"]),
        helper.make_tensor_value_info("k_cache", f, kv),
        helper.make_tensor_value_info("v_cache", f, kv),
    ]
    if spec.has_local_mask:  # the same mask cut to the last sliding_window positions
        inputs.append(helper.make_tensor_value_info("attn_bias_local", f, [1, "S", "QG", "C"]))
    new_kv = [spec.num_layers, "T", spec.num_kv_heads, spec.head_dim]
    outputs = [
        helper.make_tensor_value_info("logits", f, ["S", spec.vocab_size]),
        helper.make_tensor_value_info("new_k", f, new_kv),
        helper.make_tensor_value_info("new_v", f, new_kv),
    ]
    graph = helper.make_graph(b.nodes, "nanovllm_decoder", inputs, outputs, b.writer.initializers + b.consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nanovllm_jax")
    model.ir_version = 11  # opset 23 needs IR 11
    return model
