"""GGUF -> HF model dir: config, dequantized safetensors and tokenizer, cached by the file's hash.

llama.cpp's converter renames tensors (`blk.N.attn_q`), reverses shapes, permutes llama's Q/K rows for its
rotary layout and stores Gemma's norm weights as (1 + w); each of those is undone here so that the output dir
loads like any HF checkpoint. Only PyPI `gguf` (numpy) is used: no torch, no llama.cpp.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import xxhash

from nanovllm_jax import disk_cache
from nanovllm_jax.config import is_count

CONVERTER_VERSION = 8  # bump when the output of a conversion changes, so stale caches are not reused
_ENTRY_NAME = re.compile(disk_cache.DIGEST + r"-(?:float32|bfloat16|float16)-v\d+(?:-[0-9a-f]{8})?")
CACHE_SETTING = "XDG_CACHE_HOME (or pass cache_dir)"

# GGUF general.architecture -> (HF architectures entry, HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

DTYPES = ("float32", "bfloat16", "float16")

_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

# GGUF leaf name (after `blk.N.`) -> HF leaf name (after `model.layers.N.`); Gemma's four norms differ.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_REQUIRED_KEYS = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count", "context_length",
                  "attention.layer_norm_rms_epsilon")

# Tensors llama.cpp writes that have no HF weight; what they mean is moved into the config instead.
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight"}


def convert_gguf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 dtype: str = "float32") -> Path:
    """Convert a GGUF file to an HF model dir (cached by file hash) and return the dir."""
    gguf_path = Path(gguf_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = memoized_file_hash(gguf_path, cache_root / "hashes")
    target = cache_root / f"{digest}-{dtype}-v{CONVERTER_VERSION}-{toolchain_tag()}"
    if disk_cache.lookup(target, _is_converted):
        return target
    disk_cache.writable_dir(cache_root, CACHE_SETTING)
    disk_cache.remove_unused(cache_root, _is_entry)
    tmp = disk_cache.scratch_path(cache_root, target.name)
    tmp.mkdir()  # with the umask's mode, so other users can read a shared cache
    try:
        write_hf_dir(gguf_path, tmp, dtype)
        disk_cache.publish(tmp, target, _is_converted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_converted(entry: Path) -> bool:
    return all((entry / name).is_file() for name in ("config.json", "model.safetensors"))


def _is_entry(entry: Path) -> bool:
    return _ENTRY_NAME.fullmatch(entry.name) is not None


@functools.cache
def toolchain_tag() -> str:
    """The versions of the libraries whose output a conversion holds (transformers' tokenizer converter,
    gguf-py's dequantizers), hashed: another version converts anew rather than reuse the old one's files."""
    from importlib.metadata import version

    return xxhash.xxh3_64_hexdigest(f"transformers {version('transformers')} gguf {version('gguf')}".encode())[:8]


def default_cache_dir() -> Path:
    return disk_cache.cache_home() / "gguf"


def memoized_file_hash(path: Path, memo_dir: Path) -> str:
    """`file_hash`, remembered under `memo_dir` for this exact file: reading a 40 GB GGUF again on every
    load takes minutes. Any write to the file (or a `touch`, `cp -p` over it) changes its ctime."""
    st = path.stat()
    identity = f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    memo = memo_dir / xxhash.xxh3_128_hexdigest(identity.encode())
    try:
        digest = memo.read_text()
        if re.fullmatch(disk_cache.DIGEST, digest):  # not a memo a crash left half written
            disk_cache.mark_used(memo)
            return digest
    except OSError:
        pass
    digest = file_hash(path)
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        disk_cache.remove_unused(memo_dir, lambda entry: entry.is_file())  # memos of files moved or gone
        scratch = disk_cache.scratch_path(memo_dir, memo.name)
        scratch.write_text(digest)
        os.replace(scratch, memo)
    except OSError:  # a read-only shared cache: hash again next time
        pass
    return digest


def file_hash(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """xxh3-128 of the whole file (GB/s, but a disk reads large files far slower)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_hf_dir(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files into out_dir."""
    from tqdm.auto import tqdm

    reader = open_gguf(gguf_path)
    try:  # everything that can refuse the file, before any weight is read
        metadata, config, tokenizer, tok_config, plan = _conversion_plan(reader, dtype)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from e
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(metadata), indent=2))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    architecture = metadata["general.architecture"]
    arrays = (hf_tensor(architecture, config, t.name, dequantize(t)) for t, _, _ in
              tqdm(plan, desc=f"converting {gguf_path.name}", unit="tensor"))
    write_safetensors(out_dir / "model.safetensors", [(hf, shape) for _, hf, shape in plan], arrays, dtype)


def _conversion_plan(reader, dtype: str):
    """The metadata, HF config, tokenizer, tokenizer config and (gguf tensor, HF name, HF shape) of each tensor
    to convert; a ValueError for what the converter (or llama.cpp) refuses."""
    from . import gguf_tokenizer

    metadata = read_metadata(reader)
    if metadata.get("split.count", 1) > 1:
        raise ValueError(f"this is part {metadata.get('split.no', 0) + 1} of a {metadata['split.count']}-part "
                         "split GGUF; merge the parts first (llama.cpp: llama-gguf-split --merge FIRST_PART OUT)")
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {architecture!r}; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    check_tensor_types(reader.tensors)
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(metadata, tensors) | {"torch_dtype": dtype, "dtype": dtype}
    check_layer_tensors(tensors, config["num_hidden_layers"], architecture)
    if not gguf_tokenizer.has_vocab(metadata):
        raise ValueError("no embedded tokenizer (tokenizer.ggml.tokens and tokenizer.ggml.model are both needed); "
                         "use a GGUF with its vocabulary")
    try:
        tokenizer = gguf_tokenizer.build_tokenizer(architecture, metadata)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception (e.g. a merge of unknown tokens)
        raise ValueError(f"cannot build a tokenizer from the embedded vocabulary: {e}") from e
    tok_config = gguf_tokenizer.tokenizer_config(architecture, metadata)
    plan = [(t, hf_tensor_name(architecture, t.name), tuple(int(d) for d in reversed(t.shape)))
            for t in reader.tensors if t.name not in _CONFIG_ONLY_TENSORS]
    for t, hf_name, _ in plan:
        if hf_name is None:
            raise ValueError(f"tensor {t.name!r} has no HF counterpart for architecture {architecture!r}")
    return metadata, config, tokenizer, tok_config, plan


# ---------------------------------------------------------------- reading

def open_gguf(path: Path):
    """GGUFReader, with a truncated or corrupt file reported as a ValueError naming the file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error, TypeError) as e:
        raise ValueError(f"{path}: not a valid GGUF file (corrupt or truncated): {e}") from e
    if reader.byte_order != "I":
        raise ValueError(f"{path}: this GGUF file's byte order ({reader.endianess.name.lower()}-endian) is not this "
                         f"machine's, which is unsupported; convert it first: gguf-convert-endian {path} native")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata field as a plain Python value (strings decoded, arrays as lists)."""
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = field.contents()
        except UnicodeDecodeError as e:
            raise ValueError(f"metadata field {name!r} is not valid UTF-8 text: {e}") from e
    return metadata


def supported_tensor_types() -> set[str]:
    """The storage types gguf-py can dequantize (it grows with gguf releases)."""
    from gguf import GGMLQuantizationType

    try:
        from gguf.quants import _type_traits  # private, hence the fallback below
        return {"F32", "F16"} | {GGMLQuantizationType(t).name for t in _type_traits}
    except ImportError:
        return {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def check_tensor_types(tensors: Iterable) -> None:
    supported = supported_tensor_types()
    for t in tensors:
        if t.tensor_type.name not in supported:
            raise ValueError(f"tensor {t.name!r} has unsupported quantization type {t.tensor_type.name}; "
                             f"supported: {', '.join(sorted(supported))}")


def dequantize(tensor) -> np.ndarray:
    """The tensor as float32 in HF (row-major, reversed GGUF dims) shape."""
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


# ---------------------------------------------------------------- config

def hf_config(metadata: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """An HF config.json dict for the architectures the runner supports."""
    arch = metadata["general.architecture"]
    key = lambda name, default=None: metadata.get(f"{arch}.{name}", default)  # noqa: E731
    missing = [f"{arch}.{name}" for name in _REQUIRED_KEYS if key(name) is None]
    if missing:
        raise ValueError(f"GGUF metadata lacks {', '.join(missing)}, needed for the model config")
    for name in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count", "context_length",
                 "attention.head_count_kv", "attention.key_length", "rope.dimension_count"):
        value = key(name)
        values = value if isinstance(value, list) and name == "attention.head_count_kv" else [value]
        if value is not None and not (values and all(map(is_count, values))):
            raise ValueError(f"GGUF metadata {arch}.{name} must be a positive integer, got {value!r}")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts; the architectures here use one value
        kv_heads = max(kv_heads)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    hf_arch, model_type = ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": _vocab_size(metadata, tensors),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": metadata.get("tokenizer.ggml.unknown_token_id"),
    }
    rope_scaling = _rope_scaling(metadata, tensors, config)
    if arch == "gemma3":
        config.update(_gemma3_fields(metadata, config, rope_scaling))
    else:
        config["hidden_act"] = "silu"
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        if arch in ("llama", "qwen3"):
            config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        if arch == "llama":
            config["mlp_bias"] = False
        if arch == "qwen2":
            config["use_sliding_window"] = False
    return config


def _vocab_size(metadata: dict[str, Any], tensors: dict[str, Any]) -> int:
    """The embedding rows; llama.cpp refuses a file whose vocab_size or token list disagrees with them."""
    arch = metadata["general.architecture"]
    if "token_embd.weight" not in tensors:
        raise ValueError("the file has no token_embd.weight tensor (the token embeddings)")
    rows = int(tensors["token_embd.weight"].shape[-1])  # ggml dims are (hidden, vocab)
    declared = metadata.get(f"{arch}.vocab_size", rows)
    if declared != rows:
        raise ValueError(f"{arch}.vocab_size is {declared!r} but token_embd.weight has {rows} rows")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if len(tokens) > rows:
        raise ValueError(f"the vocabulary has {len(tokens)} tokens but token_embd.weight only {rows} rows")
    return rows


def check_layer_tensors(tensors: Iterable[str], layers: int, architecture: str) -> None:
    """Tensors of layers past block_count would be dropped silently (llama.cpp refuses such a file)."""
    extra = sorted({int(m[1]) for name in tensors if (m := re.match(r"blk\.(\d+)\.", name))} - set(range(layers)))
    if extra:
        raise ValueError(f"tensors of layer(s) {extra} but {architecture}.block_count is {layers}")


def _gemma3_fields(metadata: dict[str, Any], config: dict[str, Any], rope_scaling: dict | None) -> dict[str, Any]:
    """What Gemma 3 adds; llama.cpp hard-codes some of it rather than writing it to the file."""
    key = lambda name, default=None: metadata.get(f"gemma3.{name}", default)  # noqa: E731
    layers = config["num_hidden_layers"]
    if not is_count(key("attention.sliding_window")):  # llama.cpp requires it too
        raise ValueError(f"GGUF metadata gemma3.attention.sliding_window must be a positive integer, "
                         f"got {key('attention.sliding_window')!r}")
    pattern = key("attention.sliding_window_pattern", 6)
    if not (isinstance(pattern, list) or is_count(pattern)):
        raise ValueError(f"GGUF metadata gemma3.attention.sliding_window_pattern must be a positive integer or "
                         f"a list of per-layer flags, got {pattern!r}")
    if isinstance(pattern, list):  # newer files: one flag per layer, true where the layer slides
        layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    else:
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    local_theta = key("rope.freq_base_swa", 10000.0)
    full_rope = {"rope_type": "default", "rope_theta": config["rope_theta"]} | (rope_scaling or {})
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers): 1/sqrt(hidden/heads)
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    fields = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": key("attention.sliding_window"),
        "layer_types": layer_types,
        "rope_local_base_freq": local_theta,
        "rope_parameters": {"full_attention": full_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "final_logit_softcapping": key("final_logit_softcapping"),
        "attn_logit_softcapping": key("attn_logit_softcapping"),
    }
    if isinstance(pattern, int):
        fields["sliding_window_pattern"] = pattern
    if rope_scaling is not None:
        fields["rope_scaling"] = rope_scaling  # legacy key (transformers 4.x): applies to global layers
    return fields


def _rope_scaling(metadata: dict[str, Any], tensors: dict[str, Any], config: dict[str, Any]) -> dict | None:
    arch = metadata["general.architecture"]
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if "rope_freqs.weight" in tensors:
        return _llama3_rope_scaling(dequantize(tensors["rope_freqs.weight"]), config)
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    raise ValueError(f"unsupported RoPE scaling type {kind!r} in GGUF metadata")


def _llama3_rope_scaling(freq_factors: np.ndarray, config: dict[str, Any]) -> dict:
    """llama.cpp bakes Llama 3.1's RoPE scaling into per-frequency factors; recover the HF parameters.

    Only the published Llama 3.x parameters (low 1, high 4, original context 8192) are recognised; the factor
    is the largest divisor in the table. Any other table is refused rather than silently mis-rotated.
    """
    from nanovllm_jax.layers.rope import rope_inv_freq

    factor = float(freq_factors.max())
    candidate = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
    dim, theta = int(freq_factors.shape[0]) * 2, config["rope_theta"]
    expected = rope_inv_freq(dim, theta) / rope_inv_freq(dim, theta, candidate)  # the table these would make
    if not np.allclose(expected, freq_factors, rtol=1e-3):
        raise ValueError("unsupported rope_freqs table in GGUF (not Llama 3.x RoPE scaling)")
    return candidate


# Token texts llama.cpp ends generation at wherever they are in a vocabulary (llama-vocab.cpp), as HF generation
# configs list them (Qwen's <|im_end|> and <|endoftext|>, Llama 3's <|eot_id|>, <|eom_id|> and <|end_of_text|>)
_END_OF_GENERATION_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
                             "<end_of_turn>", "<EOT>")


def generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """EOS ids: the file's EOS plus its end-of-turn tokens, so generation stops at either."""
    eos = [metadata[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
           if f"tokenizer.ggml.{k}" in metadata]
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    eos += [i for i, token in enumerate(tokens) if token in _END_OF_GENERATION_TOKENS]
    config: dict[str, Any] = {"eos_token_id": list(dict.fromkeys(eos))}
    for name in ("bos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{name}" in metadata:
            config[name.replace("padding", "pad")] = metadata[f"tokenizer.ggml.{name}"]
    return config


# ---------------------------------------------------------------- tensors

def hf_tensor_name(architecture: str, gguf_name: str) -> str | None:
    """The HF state-dict name of a GGUF tensor, or None if it has none."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    names = _GEMMA_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    if match is None or match.group(2) not in names:
        return None
    return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{suffix}"


def hf_tensor(architecture: str, config: dict[str, Any], gguf_name: str, values: np.ndarray) -> np.ndarray:
    """Undo llama.cpp's value transforms on one dequantized tensor."""
    if architecture == "llama" and re.search(r"\.attn_[qk]\.", gguf_name):
        heads = config["num_attention_heads"] if ".attn_q." in gguf_name else config["num_key_value_heads"]
        values = unpermute_rotary_rows(values, heads)
    if architecture == "gemma3" and gguf_name.endswith("norm.weight"):
        values = values - 1.0  # Gemma computes x * (1 + w); llama.cpp stores the (1 + w)
    return values


def unpermute_rotary_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation, which interleaves each head's two rotary halves row-wise."""
    half = values.shape[0] // heads // 2
    return values.reshape(heads, half, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], arrays: Iterable[np.ndarray],
                      dtype: str) -> None:
    """Stream tensors into a safetensors file one at a time, so peak memory is one tensor, not the model."""
    np_dtype = _numpy_dtype(dtype)
    itemsize = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, shape), values in zip(specs, arrays, strict=True):
            if tuple(values.shape) != tuple(shape):
                raise ValueError(f"tensor {name}: shape {values.shape} does not match its header shape {shape}")
            f.write(np.ascontiguousarray(values, dtype=np_dtype).tobytes())


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax

        return ml_dtypes.bfloat16
    return np.dtype(dtype)
