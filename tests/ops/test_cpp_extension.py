"""The C++ kernels' build lock: one left by a killed build is cleared, a live one is not."""

import os
import time

from dyncompile.ops.cpp_extension import STALE_LOCK_S, clear_stale_lock


def _lock(root, name, age_s):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch,
                                                                      dyncompile_log):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = _lock(tmp_path, "stale_ext", STALE_LOCK_S + 60)
    fresh = _lock(tmp_path, "fresh_ext", 5)
    assert clear_stale_lock("stale_ext") is True
    assert not stale.exists()
    assert any("did not finish" in m for m in dyncompile_log)
    assert clear_stale_lock("fresh_ext") is False and fresh.exists()
    assert clear_stale_lock("no_build_yet") is False  # nothing to clear
