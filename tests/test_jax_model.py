"""The JAX models and paged attention against transformers (f32, tiny random checkpoints)."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import load_reference, reference_logits, tiny_model_dirs
from nanovllm_jax.layers.attention import AttentionMetadata, paged_attention
from nanovllm_jax.layers import attention_kernel
from nanovllm_jax.layers.attention_kernel import KernelTuning, pack_query_tiles, paged_attention_kernel, query_tile
from nanovllm_jax.loader import load_model
from nanovllm_jax.models import ForwardInputs

BLOCK = 8
BLOCKS_PER_SEQ = 8
PAGES_PER_CHUNK = 2


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    return tiny_model_dirs(tmp_path_factory)


class PagedModel:
    """Drives a model's forward directly: sequence i owns blocks [i * BLOCKS_PER_SEQ, ...)."""

    def __init__(self, model_dir, stacked: bool, num_seqs: int = 3, kernel: bool = False):
        self.kernel = kernel
        self.module, self.cfg, self.params = load_model(model_dir, "float32", stacked=stacked)
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, num_seqs * BLOCKS_PER_SEQ * BLOCK, self.cfg.head_dim)
        self.k, self.v = jnp.zeros(shape), jnp.zeros(shape)
        self.lens = [0] * num_seqs
        self.forward = jax.jit(self.module.forward, static_argnums=(4,))

    def step(self, chunks: dict[int, list[int]], all_logits: bool = True) -> dict[int, np.ndarray]:
        """Run new tokens for several sequences in one flat batch; logits for every new token."""
        ids, pos, slots, seq_ids, cached = [], [], [], [], []
        for row, (seq, tokens) in enumerate(chunks.items()):
            p = np.arange(self.lens[seq], self.lens[seq] + len(tokens))
            ids += tokens
            pos += p.tolist()
            slots += (seq * BLOCKS_PER_SEQ * BLOCK + p).tolist()
            seq_ids += [row] * len(tokens)
            cached += [self.lens[seq]] * len(tokens)
            self.lens[seq] += len(tokens)
        tables = np.stack([seq * BLOCKS_PER_SEQ + np.arange(BLOCKS_PER_SEQ) for seq in chunks])
        seq_ids = np.array(seq_ids, np.int32)
        tiles = {}
        if self.kernel:  # tiles as the runner sizes them
            t, s, group = len(ids), len(chunks), self.cfg.num_heads // self.cfg.num_kv_heads
            query_start = np.cumsum([0] + [len(tokens) for tokens in chunks.values()])
            tiles = dict(query_tile=query_tile(t, s, group, self.cfg.head_dim))
            tiles["query_tiles"] = jnp.asarray(pack_query_tiles(query_start, t, s, tiles["query_tile"]))
        meta = AttentionMetadata(
            positions=jnp.array(pos, jnp.int32), seq_ids=jnp.asarray(seq_ids),
            cached_lens=jnp.array(cached, jnp.int32), block_tables=jnp.asarray(tables[seq_ids], jnp.int32),
            block_size=BLOCK, pages_per_chunk=PAGES_PER_CHUNK, **tiles,
        )
        inputs = ForwardInputs(jnp.array(ids, jnp.int32), jnp.array(slots, jnp.int32),
                               jnp.arange(len(ids), dtype=jnp.int32), meta)
        logits, self.k, self.v = self.forward(self.params, self.k, self.v, inputs, self.cfg)
        logits = np.asarray(logits)
        return {seq: logits[seq_ids == row] for row, seq in enumerate(chunks)}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,stacked,kernel", [("qwen3", True, False), ("qwen2", False, False),
                                                 ("llama3", False, False), ("mistral", False, False),
                                                 ("qwen3", True, True), ("mistral", True, True)])
def test_prefill_chunked_and_decode_logits_match_transformers(model_dirs, name, stacked, kernel):
    """kernel: attention through the Pallas kernel (interpret mode here), under lax.scan as on GPU."""
    ref = load_reference(model_dirs[name])
    rng = np.random.default_rng(1)
    seqs = [rng.integers(2, 1024, size=n).tolist() for n in (40, 23, 30)]
    expected = [reference_logits(ref, s) for s in seqs]
    model = PagedModel(model_dirs[name], stacked, kernel=kernel)
    got = {0: [], 1: [], 2: []}
    # fresh prefills of two sequences; a chunk with a cached prefix beside a fresh prefill; a
    # one-token chunk; then decode steps of all three together (T == S).
    plan = [{0: 17, 1: 20}, {0: 20, 2: 27}, {1: 1}, {0: 1, 1: 1, 2: 1}, {0: 1, 1: 1, 2: 1}, {0: 1, 2: 1}]
    cursor = [0, 0, 0]
    for counts in plan:
        step = {}
        for seq, n in counts.items():
            step[seq] = seqs[seq][cursor[seq]: cursor[seq] + n]
            cursor[seq] += n
        for seq, logits in model.step(step).items():
            got[seq].append(logits)
    for seq in range(3):
        logits = np.concatenate(got[seq])
        assert logits.shape == expected[seq].shape
        assert rel_err(logits, expected[seq]) < 1e-4, (name, seq)
        decode_rows = slice(-2, None)  # single-token decode steps
        assert rel_err(logits[decode_rows], expected[seq][decode_rows]) < 1e-4


def naive_attention(q, k, v, seq_ids, pos, scale, window=None, softcap=None):
    """Dense reference: token t sees tokens of its own sequence at positions <= its own."""
    kv = k.shape[1]
    g = q.shape[1] // kv
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("thd,chd->htc", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    mask = (seq_ids[:, None] == seq_ids[None, :]) & (pos[None, :] <= pos[:, None])
    if window:
        mask &= pos[:, None] - pos[None, :] < window
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("htc,chd->thd", p, v)


@pytest.mark.parametrize("lens,new", [
    ([13, 6], [3, 1]),  # cached prefixes and a decode; 6 tokens: blocks of 2
    ([13, 6, 9], [1, 1, 9]),  # two decodes and a fresh prefill
    ([16, 3, 12, 7], [9, 3, 12, 6]),  # 30 + 2 padding tokens: two blocks of 16, mixed contexts
])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0), (7, 2.0)])
@pytest.mark.parametrize("tiling", [
    dict(),  # the CPU defaults
    dict(new_block=4),  # the step's own tokens span several query/key blocks
    dict(token_block=256, new_block=512),  # the accelerators' wide blocks
    dict(query_tile=4),  # the Pallas kernel (interpret mode here), tiles of up to 4 tokens
], ids=["cpu", "new_block4", "wide", "kernel"])
def test_paged_attention_matches_dense_reference(window, softcap, lens, new, tiling):
    """Sequences with cached prefixes in scattered blocks of layer 1 (layer 0 holds other data), plus
    padding tokens; GQA 4:2."""
    rng = np.random.default_rng(0)
    h, kv, d, bs, nb = 4, 2, 8, 4, 16
    tables = np.array([[5, 2, 9, 12], [7, 0, 3, 1], [4, 6, 8, 10], [11, 13, 14, 15]])[: len(lens)]
    k_all, v_all = rng.standard_normal((2, sum(lens), kv, d)).astype(np.float32)
    q_all = rng.standard_normal((sum(lens), h, d)).astype(np.float32)
    seq_of = np.repeat(np.arange(len(lens)), lens)
    pos_of = np.concatenate([np.arange(n) for n in lens])
    k_cache, v_cache = rng.standard_normal((2, 2, kv, nb * bs, d)).astype(np.float32)
    slots = tables[seq_of, pos_of // bs] * bs + pos_of % bs
    k_cache[1][:, slots] = k_all.transpose(1, 0, 2)
    v_cache[1][:, slots] = v_all.transpose(1, 0, 2)
    is_new = np.concatenate([np.arange(n) >= n - m for n, m in zip(lens, new)])
    pad = 2
    q = np.concatenate([q_all[is_new], np.zeros((pad, h, d), np.float32)])
    k_new = np.concatenate([k_all[is_new], np.zeros((pad, kv, d), np.float32)])
    v_new = np.concatenate([v_all[is_new], np.zeros((pad, kv, d), np.float32)])
    seq_ids = np.concatenate([seq_of[is_new], [-1] * pad]).astype(np.int32)
    positions = np.concatenate([pos_of[is_new], [0] * pad]).astype(np.int32)
    cached = np.array([lens[s] - new[s] if s >= 0 else 0 for s in seq_ids], np.int32)
    if "query_tile" in tiling:
        query_start = np.cumsum([0] + new)
        tiles = pack_query_tiles(query_start, len(q), len(lens), tiling["query_tile"])
        tiling = tiling | dict(query_tiles=jnp.asarray(tiles))
    meta = AttentionMetadata(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(cached),
                             jnp.asarray(tables[np.maximum(seq_ids, 0)], jnp.int32), bs, 2, **tiling)
    out = paged_attention(jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(k_cache),
                          jnp.asarray(v_cache), meta, scale=0.3, layer=jnp.int32(1), sliding_window=window,
                          softcap=softcap)
    expected = naive_attention(q_all, k_all, v_all, seq_of, pos_of, 0.3, window, softcap)[is_new]
    np.testing.assert_allclose(np.asarray(out)[: is_new.sum()], expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()  # padding tokens too


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("bs,width", [(4, 16), (32, 2)])
def test_attention_kernel_variants_agree(window, bs, width):
    """Programs sharing a tile's keys (3 splits: uneven shares, some empty) and pages read in parts (a
    key tile smaller than a page) give the output of one program reading whole pages; a prefill
    chunk in one tile or in tiles of one token each, too. GQA 6:2 (3 query heads per kv head, padded
    to 4 in the kernel). test_paged_attention_matches_dense_reference checks the kernel itself."""
    rng = np.random.default_rng(0)
    kv, h, d = 2, 6, 16
    lens, new = np.array([1, 4, 17, 40, 63]), np.array([1, 4, 1, 8, 1])  # two prefill chunks among decodes
    t = int(new.sum())
    seq_ids = np.repeat(np.arange(len(lens)), new).astype(np.int32)
    positions = np.concatenate([np.arange(n - m, n) for n, m in zip(lens, new)]).astype(np.int32)
    tables = rng.permutation(len(lens) * width).reshape(len(lens), width).astype(np.int32)
    k_cache, v_cache = rng.standard_normal((2, 2, kv, len(lens) * width * bs, d)).astype(np.float32)
    q = jnp.asarray(rng.standard_normal((t, h, d)).astype(np.float32))

    def attend(tile: int, **tuning):
        query_tiles = pack_query_tiles(np.cumsum([0, *new]), t, len(lens), tile)
        meta = AttentionMetadata(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(positions - positions),
                                 jnp.asarray(tables[seq_ids]), block_size=bs, pages_per_chunk=2, query_tile=tile,
                                 query_tiles=jnp.asarray(query_tiles))
        return np.asarray(paged_attention_kernel(q, jnp.asarray(k_cache), jnp.asarray(v_cache), 1, meta, scale=0.3,
                                                 sliding_window=window, softcap=None,
                                                 tuning=KernelTuning(split_below=1 << 30, **tuning)))

    one = attend(8, splits=1)
    parts = dict(key_tile_bytes=16 * d * 4)  # 16 keys per iteration: half a 32-token page
    for tile, variant in ((8, dict(splits=3)), (1, dict(splits=1)),
                          (8, parts | dict(splits=1)), (8, parts | dict(splits=3))):
        np.testing.assert_allclose(attend(tile, **variant), one, rtol=1e-5, atol=1e-6)


def _cuda_mlir(monkeypatch, fn, *args) -> str:
    """fn lowered for CUDA as a GPU build would (the Pallas kernel through Triton, not interpreted),
    on this machine: the StableHLO text."""
    from jax import export

    monkeypatch.setattr(attention_kernel.jax, "default_backend", lambda: "gpu")
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()


@pytest.mark.parametrize("heads", [16, 12])  # 2 query heads per kv head; 3, padded to 4
@pytest.mark.parametrize("bs", [16, 256])  # 256: 64 KB pages, read a part per iteration
def test_attention_kernel_lowers_to_triton(heads, bs, monkeypatch):
    """The kernel as a GPU build would lower it (Pallas -> Triton IR), without a GPU: an op Triton
    lowering lacks fails here rather than on a lent machine. (Whole pages of 256 tokens overflowed
    an H200's shared memory in 64-row prefill tiles: found by compiling for one, gpu_aot_census.py.)"""
    t, kv, d, width = 512, 4, 128, 2048 // bs
    tile = query_tile(t, 64, heads // kv, d)
    meta = AttentionMetadata(jnp.zeros(t, jnp.int32), jnp.zeros(t, jnp.int32), jnp.zeros(t, jnp.int32),
                             jnp.zeros((t, width), jnp.int32), block_size=bs, pages_per_chunk=8, query_tile=tile,
                             query_tiles=jnp.zeros((t // tile + 64, 2), jnp.int32))

    def fn(q, k, v):
        return paged_attention_kernel(q, k, v, 1, meta, scale=0.1, sliding_window=64, softcap=30.0,
                                      tuning=KernelTuning())

    cache = jax.ShapeDtypeStruct((2, kv, t * width * bs, d), jnp.bfloat16)
    text = _cuda_mlir(monkeypatch, fn, jax.ShapeDtypeStruct((t, heads, d), jnp.bfloat16), cache, cache)
    assert text.count("xla.gpu.triton") == 1


def test_gpu_decode_forward_has_no_control_flow_but_the_layer_scan(monkeypatch):
    """On GPU every lax.cond, and every loop whose trip count depends on data, makes the dispatching
    thread wait for the device (XLA copies the predicate back). A decode step's forward must have
    neither, so the host schedules the next step while the device runs this one; lowered for cuda here."""
    import re
    from functools import partial

    from nanovllm_jax.jax_runner import _forward_step
    from nanovllm_jax.models import llama
    from nanovllm_jax.random_models import RANDOM_CONFIGS
    from nanovllm_jax.step_packing import SeqLayout, StepLayout

    mc = llama.parse_config(dict(RANDOM_CONFIGS["qwen3-0.6b"], num_hidden_layers=2))
    params = jax.eval_shape(lambda: llama.random_params(mc, dtype="bfloat16", stacked=True))
    slots, tokens = 1 << 16, 256
    tile = query_tile(tokens, tokens, mc.num_heads // mc.num_kv_heads, mc.head_dim)
    layout = StepLayout(tokens, SeqLayout(tokens, 128, 1, 16), 8, slots, 256, 512, query_tile=tile)
    cache = jax.ShapeDtypeStruct((2, mc.num_kv_heads, slots, mc.head_dim), jnp.bfloat16)
    ints = [jax.ShapeDtypeStruct((n,), jnp.int32) for n in (slots, tokens, layout.size)]
    step = partial(_forward_step, forward=llama.forward, model_config=mc, layout=layout)
    text = _cuda_mlir(monkeypatch, step, params, cache, cache, *ints)
    count = {op: len(re.findall(rf"stablehlo\.{op}\b", text)) for op in ("while", "if", "case")}
    assert count == {"while": 1, "if": 0, "case": 0}  # the while: lax.scan over layers (a static trip count)


@pytest.mark.parametrize("kind", ["greedy", "plain", "full"])
def test_gpu_greedy_and_plain_samplers_have_no_control_flow(kind, monkeypatch):
    """The sampler programs of steps without filters, penalties or logprobs have no lax.cond (lowered
    for cuda here), so on GPU the host queues them behind the running forward without waiting;
    the full sampler keeps its conds (the costly features run only when asked for)."""
    import re
    from functools import partial

    from nanovllm_jax.jax_runner import _sample_step
    from nanovllm_jax.runner import MAX_BANNED_IDS
    from nanovllm_jax.step_packing import SeqLayout

    layout, slots = SeqLayout(256, 128, MAX_BANNED_IDS, 16), 1 << 16
    step = partial(_sample_step, layout=layout, kind=kind, max_seqs=256)
    args = (jax.ShapeDtypeStruct((256, 151936), jnp.float32), jax.ShapeDtypeStruct((slots,), jnp.int32),
            jax.ShapeDtypeStruct((layout.size,), jnp.int32))
    text = _cuda_mlir(monkeypatch, step, *args)
    flow = sum(len(re.findall(rf"stablehlo\.{op}\b", text)) for op in ("while", "if", "case"))
    assert (flow > 0) == (kind == "full"), flow


def test_loader_errors_name_the_problem(model_dirs, tmp_path):
    src = model_dirs["qwen2"]

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    bad_arch = copy("arch")
    config = json.loads((bad_arch / "config.json").read_text())
    (bad_arch / "config.json").write_text(json.dumps(config | {"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match="FooForCausalLM"):
        load_model(bad_arch)

    no_layers = copy("no_layers")
    (no_layers / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"}))
    with pytest.raises(ValueError, match="config.json lacks the field 'num_hidden_layers'"):
        load_model(no_layers)
    for field, value in (("num_hidden_layers", "2"), ("num_attention_heads", 0), ("max_position_embeddings", None),
                         ("max_position_embeddings", 2048.5), ("text_config", [1])):
        (no_layers / "config.json").write_text(json.dumps(config | {field: value}))
        with pytest.raises(ValueError, match=field if field == "text_config" else "config.json"):
            load_model(no_layers)

    bad_shape = copy("shape")
    (bad_shape / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
        load_model(bad_shape)

    from safetensors.numpy import load_file, save_file

    missing = copy("missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(missing)


def test_loads_sharded_checkpoint_in_bfloat16(model_dirs, tmp_path):
    """Several safetensors files behind an index; weights arrive as bf16 device arrays."""
    from safetensors.numpy import load_file, save_file

    src = model_dirs["llama3"]
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / fname)
        weight_map |= {n: fname for n in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, cfg, params = load_model(dst, "bfloat16")
    assert params["embed"].dtype == jnp.bfloat16 and params["rope_inv_freq"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(params["embed"], np.float32), tensors["model.embed_tokens.weight"],
                               rtol=1e-2, atol=1e-2)


def test_whole_number_floats_in_config_shape_fields_are_counts():
    """Some exporters write counts as floats (2048.0): taken as integers."""
    from nanovllm_jax.models import llama
    from nanovllm_jax.random_models import RANDOM_CONFIGS

    base = dict(RANDOM_CONFIGS["qwen3-0.6b"], num_hidden_layers=2)
    assert llama.parse_config(dict(base, max_position_embeddings=2048.0)) == llama.parse_config(
        dict(base, max_position_embeddings=2048))
