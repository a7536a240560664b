"""Cache entries made by slow work (GGUF conversions, ONNX exports): written aside, renamed into place,
shared by processes (and users) on one disk, removed once long unused."""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

SCRATCH_TTL_S = 24 * 3600
UNUSED_TTL_S = 30 * 24 * 3600


def scratch_path(directory: Path, name: str) -> Path:
    """A path under `directory` to write `name` into before renaming it into place. Scratch untouched
    for a day (a killed writer's) is removed first: a running one writes far more often, and whether
    its process is alive cannot be told across hosts or PID namespaces sharing a cache."""
    for old in directory.glob(".scratch-*"):
        try:
            entries = [old, *old.iterdir()] if old.is_dir() else [old]
            if time.time() - max(p.stat().st_mtime for p in entries) < SCRATCH_TTL_S:
                continue
        except OSError:  # renamed into place or removed meanwhile
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return directory / f".scratch-{os.getpid()}-{secrets.token_hex(4)}-{name}"


def publish(scratch: Path, target: Path, is_complete: Callable[[Path], bool]) -> bool:
    """Rename the finished `scratch` dir to `target` (atomic: a dir under its final name is always
    complete); False when a concurrent writer got there first. The caller removes the scratch."""
    try:
        os.rename(scratch, target)
        return True
    except OSError as e:
        if not is_complete(target):  # not a concurrent writer winning the race
            raise OSError(f"cache entry {target} is incomplete (files deleted by hand?): delete it") from e
        return False


def mark_used(entry: Path) -> None:
    """Its mtime records the last use, for remove_unused."""
    try:
        os.utime(entry)
    except OSError:  # a read-only shared cache
        pass


def remove_unused(root: Path, is_removable: Callable[[Path], bool], ttl_s: float = UNUSED_TTL_S) -> None:
    """Remove the entries `is_removable` picks that were not used for `ttl_s`. A process still reading one
    keeps its open files: Linux frees them only once closed."""
    for entry in root.iterdir():
        if not is_removable(entry):
            continue
        try:
            if time.time() - entry.stat().st_mtime < ttl_s:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
