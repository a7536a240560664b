"""Cache entries shared by processes: atomic publish, a lost race, removal of unused entries."""
import os
import time
from pathlib import Path

import pytest

from nanovllm_jax import disk_cache


def complete(entry):
    return (entry / "done").is_file()


def written(directory, name):
    scratch = disk_cache.scratch_path(directory, name)
    scratch.mkdir()
    (scratch / "done").write_text(name)
    return scratch


def test_publish_renames_into_place_and_a_concurrent_winner_is_kept(tmp_path):
    target = tmp_path / "entry"
    assert disk_cache.publish(written(tmp_path, "entry"), target, complete)
    late = written(tmp_path, "entry")
    assert not disk_cache.publish(late, target, complete)  # the first writer's entry stays
    assert late.exists() and (target / "done").read_text() == "entry"
    assert disk_cache.lookup(target, complete) and not disk_cache.lookup(tmp_path / "missing", complete)
    (target / "done").unlink()
    with pytest.raises(OSError, match="is incomplete"):
        disk_cache.lookup(target, complete)


def test_publish_syncs_the_files_and_the_rename_to_disk(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    scratch = written(tmp_path, "entry")
    (scratch / "sub").mkdir()
    (scratch / "sub" / "weights").write_bytes(b"w")
    assert disk_cache.publish(scratch, tmp_path / "entry", complete)
    # every file and dir while still under the scratch name, then the parent holding the rename
    assert sorted(synced[:-1]) == sorted(str(p) for p in (scratch, scratch / "done", scratch / "sub", scratch / "sub/weights"))
    assert synced[-1] == str(tmp_path)


def test_an_unwritable_cache_dir_is_an_os_error_naming_it_and_the_setting(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a dir")
    with pytest.raises(OSError, match=f"cannot write the cache dir {blocked}/gguf .*; set XDG_CACHE_HOME to"):
        disk_cache.writable_dir(blocked / "gguf", "XDG_CACHE_HOME")
    assert disk_cache.writable_dir(tmp_path / "a" / "b", "X") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()


def test_remove_unused_keeps_what_was_used_recently_or_is_not_picked(tmp_path):
    old, recent, other, memo = tmp_path / "old", tmp_path / "recent", tmp_path / "other", tmp_path / "memo"
    for entry in (old, recent, other):
        entry.mkdir()
    memo.write_text("x")
    long_ago = time.time() - disk_cache.UNUSED_TTL_S - 60
    for entry in (old, other, memo):
        os.utime(entry, (long_ago, long_ago))
    disk_cache.remove_unused(tmp_path, lambda entry: entry.name != "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "recent"]


@pytest.mark.parametrize("xdg, expected", [(None, "~/.cache"), ("", "~/.cache"), ("relative/dir", "~/.cache"),
                                           ("/srv/cache", "/srv/cache")])
def test_cache_home_follows_an_absolute_xdg_cache_home(monkeypatch, xdg, expected):
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert disk_cache.cache_home() == Path(expected).expanduser() / "nanovllm_jax"
