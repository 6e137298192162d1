"""The C++ kernels: each a .cpp file beside its cpu.py (shared helpers in ops/common.h); the
build lock: one left by a killed build is cleared, a live one is not."""

import fnmatch
import importlib
import os
import pathlib
import re
import time

from dyncompile.ops import cpp_extension
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


OPS = pathlib.Path(cpp_extension.__file__).parent


def _extensions():
    """(op folder, InlineExtension) for every extension an op's cpu.py declares."""
    found = []
    for cpu in sorted(OPS.glob("*/cpu.py")):
        module = importlib.import_module(f"dyncompile.ops.{cpu.parent.name}.cpu")
        found += [(cpu.parent, v) for v in vars(module).values()
                  if isinstance(v, cpp_extension.InlineExtension)]
    return found


def test_every_kernel_is_a_cpp_file_beside_its_python_shipped_as_package_data():
    exts = _extensions()
    assert {folder.name for folder, _ in exts} >= {
        "cats_glu", "expert_ffn", "expert_route", "sparse_linear", "token_mean"}
    for folder, ext in exts:
        path = pathlib.Path(ext.path)
        assert path.is_file(), ext.name
        assert path.parent == folder and path.name == f"{folder.name}.cpp"
        assert "#include <" not in (folder / "cpu.py").read_text()  # no C++ left in the Python
        # matched by pyproject.toml's package-data globs (ops/*/*.cpp, ops/*.h)
        assert fnmatch.fnmatch(path.relative_to(OPS.parent).as_posix(), "ops/*/*.cpp")
    assert (OPS / "common.h").is_file() and cpp_extension.INCLUDE_DIR == str(OPS)


def test_the_shared_helpers_come_from_common_h():
    header = (OPS / "common.h").read_text()
    helpers = re.findall(r"^static inline \w+ (\w+)\(", header, re.M)
    assert "dot4" in helpers
    users = 0
    for _, ext in _extensions():
        text = pathlib.Path(ext.path).read_text()
        used = [h for h in helpers if re.search(rf"\b{h}\(", text)]
        for h in helpers:  # defined once, in the header
            assert not re.search(rf"^static inline \w+ {h}\(", text, re.M), (ext.name, h)
        if used:
            users += 1
            assert '#include "common.h"' in text, (ext.name, used)
    assert users >= 1  # expert_ffn's fused kernel uses dot4


def test_source_puts_the_defines_ahead_of_the_file(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int64_t limit() { return LIMIT; }\n")
    ext = cpp_extension.InlineExtension("dyncompile_test_ext", src, ["limit"],
                                        defines={"LIMIT": 1 << 18})
    assert ext.source() == "#define LIMIT 262144\nint64_t limit() { return LIMIT; }\n"
    assert cpp_extension.InlineExtension("x", src, ["limit"]).source() == src.read_text()


def test_common_header_is_spliced_and_the_build_is_named_by_its_source(tmp_path):
    from dyncompile.ops.expert_ffn import cpu

    src = cpu._EXT.source()
    assert '#include "common.h"' not in src and "static inline void dot4(" in src
    # the same kernel from another checkout builds under the same name (no folder in it);
    # another version of it under another
    other = tmp_path / "expert_ffn.cpp"
    other.write_text(pathlib.Path(cpu._EXT.path).read_text())
    copy = cpp_extension.InlineExtension(cpu._EXT.name, other, cpu._EXT.functions,
                                         cpu._EXT.cflags)
    assert copy.build_name(copy.source()) == cpu._EXT.build_name(src)
    other.write_text(pathlib.Path(cpu._EXT.path).read_text() + "\n// changed\n")
    assert copy.build_name(copy.source()) != cpu._EXT.build_name(src)
