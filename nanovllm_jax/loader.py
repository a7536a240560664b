"""Load an HF model dir (config.json + one or many *.safetensors) into a device params pytree.

Weights go from disk to numpy (safetensors' numpy API; ml_dtypes gives numpy bfloat16) to device
in the chosen dtype, with no torch.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" for safetensors' numpy reader
import numpy as np
from safetensors import SafetensorError, safe_open

from nanovllm_jax.config import read_json_object, text_config_of
from nanovllm_jax.models import model_module

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# safetensors dtypes whose values are the weights themselves; anything else (I8/U8/I32 codes, F8_E4M3 ...)
# needs scales this loader does not apply, so reading it as a float would give a silently wrong model
FLOAT_TENSOR_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsDir:
    """Name -> numpy tensor over every safetensors file of a model dir."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {model_dir}")
        self._handles: dict[str, object] = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = model_dir / name
            if not path.exists():
                raise ValueError(f"safetensors file {path} named in the index is missing")
            try:
                handle = safe_open(str(path), framework="numpy")
            except SafetensorError as e:
                raise ValueError(f"cannot read safetensors file {path}: {e}") from e
            self._handles[name] = handle
            for tensor in handle.keys():
                if tensor in self._file_of:  # which copy a loader takes would be arbitrary
                    raise ValueError(f"tensor {tensor!r} is stored twice in {model_dir}: "
                                     f"in {self._file_of[tensor]} and {name}")
                self._file_of[tensor] = name

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray:
        if name not in self._file_of:
            raise ValueError(f"missing tensor {name!r} in the checkpoint")
        handle = self._handles[self._file_of[name]]
        try:
            dtype = handle.get_slice(name).get_dtype()
            if dtype not in FLOAT_TENSOR_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {dtype}, which is unsupported: weights must be "
                                 f"{', '.join(FLOAT_TENSOR_DTYPES)} (quantized checkpoints are unsupported)")
            return handle.get_tensor(name)
        except (SafetensorError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read tensor {name!r}: {e}") from e


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"no config.json in {model_dir}")
    config = read_json_object(path)
    check_not_quantized(config, model_dir)
    return config


def check_not_quantized(hf: dict, model_dir: str | Path) -> None:
    """ValueError for a quantized HF checkpoint (config.json `quantization_config`, at the top or in a
    multimodal `text_config`): its int/fp8 weights need scales and kernels this engine does not have.
    GGUF files are dequantized at conversion, and their converted dirs carry no quantization_config."""
    for config in (hf, text_config_of(hf, Path(model_dir) / "config.json")):
        quant = config.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise ValueError(f"{model_dir}: quantized checkpoints (quant_method={method}) are unsupported; "
                             f"use the unquantized (float) checkpoint, or a GGUF file (dequantized on load)")


def load_model(model_dir: str | Path, dtype: str = "float32", stacked: bool = True) -> tuple[ModuleType, object, dict]:
    """(model module, static model config, device params) for an HF model dir; `stacked`: see to_device."""
    hf = read_hf_config(model_dir)
    module = model_module(hf)
    cfg = module.parse_config(hf)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    unstable = getattr(module, "FLOAT16_UNSUPPORTED", None)
    if dtype == "float16" and unstable:
        raise ValueError(f"{model_dir}: this architecture does not run in float16 ({unstable}); "
                         "use dtype='bfloat16' or 'float32'")
    target = np.dtype(DTYPES[dtype])
    tensors = SafetensorsDir(model_dir)

    def get(name: str, shape: tuple) -> np.ndarray:
        array = tensors.get(name)
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)} from config.json")
        return array.astype(target)

    host = module.load_params(cfg, get, tensors.__contains__)
    return module, cfg, to_device(host, dtype, stacked)


def to_device(host_params: dict, dtype: str, stacked: bool = True) -> dict:
    """Device arrays in `dtype`; RoPE tables (keys "rope*") stay f32: angles need the precision.

    stacked=False splits params["layers"] (arrays stacked on axis 0) into a list of per-layer dicts
    of separate buffers, for the unrolled forward (the fast one on XLA:CPU)."""
    target = DTYPES[dtype]

    def put(path, leaf):
        keep_f32 = any(str(getattr(k, "key", "")).startswith("rope") for k in path)
        return jax.device_put(np.asarray(leaf, np.float32 if keep_f32 else target))

    if not stacked:
        layers = host_params["layers"]
        count = len(next(iter(layers.values())))
        host_params = host_params | {"layers": [{k: a[i] for k, a in layers.items()} for i in range(count)]}
    return jax.tree_util.tree_map_with_path(put, host_params)
