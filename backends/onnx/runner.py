"""OnnxRunner: the exported decoder on onnxruntime behind the engine's runner protocol.

The runner owns the paged KV cache as two numpy arrays [layers, kv_heads, blocks, block_size, head_dim] that
onnxruntime reads in place (bound once as OrtValues). Each step the graph returns only this step's
K/V rows, which the runner scatters at slot_mapping; a token-id cache beside them feeds the penalties.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from backends.onnx.export import DATA_FILE, FORMAT_VERSION, METADATA_FILE, MODEL_FILE, ensure_exported, is_exported_dir
from backends.onnx.model_spec import read_spec
from backends.onnx.step_inputs import pack_group, row_groups, token_rows
from backends.sampler import sample
from nanovllm_jax.config import EngineConfig, is_count, read_json_object
from nanovllm_jax.runner import (HostRunner, StepBatch, StepOutput, allocating_kv_cache, kv_block_bytes,
                                 read_contexts)

DEFAULT_KV_CACHE_BYTES = 512 * 2**20


class OnnxRunner(HostRunner):
    def __init__(self, config: EngineConfig):
        if config.dtype not in (None, "float32"):
            raise ValueError(f"the onnx backend runs float32 only, got dtype={config.dtype!r}")
        if not is_exported_dir(config.model):  # settings the model cannot take: refused before exporting it
            config.finalize(read_spec(config.model).max_position_embeddings)
        model_dir = ensure_exported(config.model)
        self.meta = _read_metadata(model_dir)
        config.finalize(self.meta["max_position_embeddings"])
        self.session = _open_session(model_dir / MODEL_FILE)
        _check_graph_matches(self.session, self.meta, model_dir)
        self.vocab_size = int(self.meta["vocab_size"])
        self.block_size = config.kvcache_block_size
        self.group_size = self.meta["num_heads"] // self.meta["num_kv_heads"]
        self.sliding_window = None
        if "attn_bias_local" in self.meta["inputs"]:
            # a null sliding_window means no window; only exports older than graph.py's has_local_mask
            # still take attn_bias_local for it
            self.sliding_window = self.meta["sliding_window"] or self.meta["max_position_embeddings"]
        self.num_kvcache_blocks = self._num_blocks(config)

        m = self.meta
        # head-major and block-major, so that one block of one head is a contiguous [bs, D] run
        shape = (m["num_layers"], m["num_kv_heads"], self.num_kvcache_blocks, self.block_size, m["head_dim"])
        with allocating_kv_cache(self.num_kvcache_blocks, self.block_size, self._block_bytes()):
            self.k_cache = np.zeros(shape, dtype=np.float32)
            self.v_cache = np.zeros(shape, dtype=np.float32)
            self.token_cache = np.full(self.num_kvcache_blocks * self.block_size, -1, dtype=np.int32)
        # wrap, not copy: the graph reads the very buffers the runner writes into
        self._cache_values = {
            "k_cache": ort.OrtValue.ortvalue_from_numpy(self.k_cache),
            "v_cache": ort.OrtValue.ortvalue_from_numpy(self.v_cache),
        }

    def _block_bytes(self) -> int:
        m = self.meta
        return kv_block_bytes(m["num_layers"], m["num_kv_heads"], m["head_dim"], self.block_size, 4)

    def _num_blocks(self, config: EngineConfig) -> int:
        if config.num_kvcache_blocks is not None:
            return config.num_kvcache_blocks
        block_bytes = self._block_bytes()
        budget = config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
        if budget < block_bytes:
            raise ValueError(f"kv_cache_memory_bytes ({budget}) holds no {self.block_size}-token block "
                             f"({block_bytes} bytes): raise it or set num_kvcache_blocks")
        # more blocks than every running sequence at full length can use would only idle
        return min(budget // block_bytes, config.max_num_seqs * config.max_blocks_per_seq)

    def execute(self, batch: StepBatch) -> StepOutput:
        logits = np.empty((batch.num_seqs, self.vocab_size), dtype=np.float32)
        for rows in row_groups(batch):
            logits[rows] = self._run_group(batch, rows)
        self.token_cache[batch.slot_mapping] = batch.input_ids
        contexts = read_contexts(self.token_cache, batch, self.block_size) if batch.sampling.needs_penalties else None
        return sample(logits, batch.sampling, batch.context_lens, contexts)

    def _run_group(self, batch: StepBatch, rows: np.ndarray) -> np.ndarray:
        inputs = pack_group(batch, rows, self.block_size, self.group_size, self.sliding_window)
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name, value in self._cache_values.items():
            binding.bind_ortvalue_input(name, value)
        for name in ("logits", "new_k", "new_v"):
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, new_k, new_v = (v.numpy() for v in binding.get_outputs())
        blocks, offsets = np.divmod(batch.slot_mapping[token_rows(batch, rows)], self.block_size)
        self.k_cache[:, :, blocks, offsets] = new_k.transpose(0, 2, 1, 3)  # [L, T, KVH, D] -> [L, KVH, T, D]
        self.v_cache[:, :, blocks, offsets] = new_v.transpose(0, 2, 1, 3)
        return logits


def _read_metadata(model_dir: Path) -> dict:
    path = model_dir / METADATA_FILE
    try:
        meta = read_json_object(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read ONNX metadata: {e}; re-export") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is format {meta.get('format_version')}, this runner reads {FORMAT_VERSION}; re-export")
    bad = [k for k in _META_COUNTS if not is_count(meta.get(k))]
    if not bad and meta["num_heads"] % meta["num_kv_heads"]:
        bad = ["num_heads", "num_kv_heads"]
    if not isinstance(meta.get("inputs"), list):
        bad.append("inputs")
    if bad:
        raise ValueError(f"ONNX metadata {path} lacks or has bad {', '.join(bad)}; re-export")
    return meta


_META_COUNTS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _check_graph_matches(session: ort.InferenceSession, meta: dict, model_dir: Path) -> None:
    """The graph's fixed dims are the metadata's: else the first step fails deep in onnxruntime or numpy."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    logits = {o.name: o.shape for o in session.get_outputs()}.get("logits")
    kv = inputs.get("k_cache")
    dims = [meta[k] for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")]
    if (sorted(inputs) != sorted(meta["inputs"]) or kv is None or len(kv) != 5 or logits is None
            or [kv[0], kv[1], kv[4], logits[-1]] != dims):
        raise ValueError(f"{model_dir / MODEL_FILE} does not match {model_dir / METADATA_FILE} "
                         "(files of different exports?): re-export the model dir")


def _open_session(path: Path) -> ort.InferenceSession:
    if not path.exists():
        raise ValueError(f"ONNX model file {path} is missing; re-export the model dir")
    if not path.with_name(DATA_FILE).exists():
        raise ValueError(f"ONNX weight file {path.with_name(DATA_FILE)} is missing; re-export the model dir")
    options = ort.SessionOptions()
    threads = os.environ.get("NANOVLLM_JAX_ONNX_THREADS", "0")  # 0: all cores
    if not (threads.isascii() and threads.isdigit()) or int(threads) > 2**31 - 1:
        raise ValueError(f"NANOVLLM_JAX_ONNX_THREADS must be a number of threads (0: all cores), got {threads!r}")
    options.intra_op_num_threads = int(threads)
    # CPU only: the KV cache is a host array fed to every step, which on CUDA would copy all of it per step
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
        raise ValueError(f"cannot load ONNX model file {path} (corrupt? re-export it): {e}") from e
