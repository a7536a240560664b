"""Cache entries made by slow work (GGUF conversions, ONNX exports): written aside, renamed into place,
shared by processes (and users) on one disk, removed once long unused."""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

SCRATCH_TTL_S = 24 * 3600
UNUSED_TTL_S = 30 * 24 * 3600
DIGEST = r"[0-9a-f]{32}"  # an xxh3-128 hex digest: what entries are keyed by


def cache_home() -> Path:
    """Where every cache of this package lives: ~/.cache/nanovllm_jax, or under $XDG_CACHE_HOME
    (an absolute path; the XDG spec has a relative one ignored)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "nanovllm_jax"


def writable_dir(path: Path, setting: str) -> Path:
    """`path`, created if need be; an OSError naming it and the `setting` that moves it when it cannot be
    (a read-only home, a file in its place)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise OSError(e.errno, f"cannot write the cache dir {path} ({e.strerror or e}); "
                               f"set {setting} to a writable directory") from e
    return path


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
        _remove(old)
    return directory / f".scratch-{os.getpid()}-{secrets.token_hex(4)}-{name}"


def lookup(target: Path, is_complete: Callable[[Path], bool]) -> bool:
    """Whether `target` holds a complete entry (then marked used). One missing files was damaged by
    hand: an error naming it, rather than a repair racing other processes."""
    if is_complete(target):
        mark_used(target)
        return True
    if target.exists():
        raise OSError(f"cache entry {target} is incomplete (files deleted by hand?): delete it")
    return False


def publish(scratch: Path, target: Path, is_complete: Callable[[Path], bool]) -> bool:
    """Rename the finished `scratch` dir to `target` (atomic: a dir under its final name is always
    complete); False when a concurrent writer got there first. The caller removes the scratch.
    Its files reach the disk before the rename does: after a power cut a complete-looking entry could
    otherwise hold empty files."""
    _sync_tree(scratch)
    try:
        os.rename(scratch, target)
    except OSError:
        if not lookup(target, is_complete):
            raise
        return False
    _fsync(target.parent)
    return True


def mark_used(entry: Path) -> None:
    """Its mtime records the last use, for remove_unused."""
    try:
        os.utime(entry)
    except OSError:  # a read-only shared cache, or another user's entry
        pass


def remove_unused(root: Path, is_removable: Callable[[Path], bool], ttl_s: float = UNUSED_TTL_S) -> None:
    """Remove the entries `is_removable` picks that were not used for `ttl_s`. Each is first renamed
    aside, so that no reader finds it half deleted (one that opened its files keeps them: Linux frees
    them once closed), and put back if a use touched it in between."""
    for entry in root.iterdir():
        if not is_removable(entry) or _used_within(entry, ttl_s):
            continue
        doomed = scratch_path(root, "removed")
        try:
            os.rename(entry, doomed)
        except OSError:  # removed or renamed meanwhile
            continue
        try:
            if _used_within(doomed, ttl_s):
                os.rename(doomed, entry)
                continue
        except OSError:  # a new entry took its place meanwhile
            pass
        _remove(doomed)


def _sync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        _fsync(path)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _used_within(entry: Path, ttl_s: float) -> bool:
    try:
        return time.time() - entry.stat().st_mtime < ttl_s
    except OSError:
        return True  # gone meanwhile: leave it
