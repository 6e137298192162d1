"""C++ CPU kernels built on first use with ``torch.utils.cpp_extension.load_inline``.

Each op's ``cpu.py`` declares one ``InlineExtension`` on the C++ file beside it
(``ops/<op>/<op>.cpp``, read when the kernel is first loaded); the build happens once
per process (cached on disk after the first time), and if no compiler is
available a warning is logged once and ``load()`` returns None so the op takes
its torch path. Helpers shared by several kernels live in ``ops/common.h``: a kernel
writes ``#include "common.h"`` and the header's text is spliced in its place.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Mapping
from types import ModuleType

log = logging.getLogger("dyncompile")

# A build lock older than this was left by a build that was killed (the kernels build
# in well under a minute): left in place, every later load would wait on it forever.
STALE_LOCK_S = 15 * 60

# The folder of ``common.h``. A kernel's ``#include "common.h"`` is spliced in with the
# header's text rather than put on the include path: the compile command then names no
# folder of this checkout, so two checkouts (or a test run beside CI) share one build.
INCLUDE_DIR = os.path.dirname(os.path.abspath(__file__))
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


class InlineExtension:
    """A lazily built C++ extension from the source file ``path``: ``load()`` gives the
    module or None. ``defines`` become ``#define NAME VALUE`` lines ahead of the file's
    text (constants the Python side owns)."""

    def __init__(self, name: str, path: str | os.PathLike[str], functions: list[str],
                 cflags: tuple[str, ...] = ("-O3", "-march=native"),
                 defines: Mapping[str, object] | None = None) -> None:
        self.name, self.path, self.functions, self.cflags = name, os.fspath(path), functions, cflags
        self.defines = dict(defines or {})
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._failed = False

    def load(self) -> ModuleType | None:
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    from torch.utils.cpp_extension import load_inline

                    source = self.source()
                    name = self.build_name(source)
                    clear_stale_lock(name)
                    os.environ.setdefault("MAX_JOBS", "2")
                    self._module = load_inline(
                        name=name, cpp_sources=[source], functions=self.functions,
                        extra_cflags=[*self.cflags, *parallel_flags()],
                        extra_ldflags=parallel_flags(), verbose=False)
                except Exception as e:  # noqa: BLE001  (no compiler: the op's torch path)
                    log.warning("dyncompile: C++ kernel %s unavailable (%s); using the torch "
                                "path", self.name, e)
                    self._failed = True
        return self._module

    def available(self) -> bool:
        return self.load() is not None

    def source(self) -> str:
        """The C++ handed to ``load_inline``: the ``defines``, then the file's text with
        each ``#include "header"`` of this folder replaced by the header's text."""
        with open(self.path, encoding="utf-8") as f:
            text = f.read()

        def splice(m: re.Match) -> str:
            header = os.path.join(INCLUDE_DIR, m.group(1))
            if not os.path.isfile(header):
                return m.group(0)
            with open(header, encoding="utf-8") as f:
                body = f.read().replace("#pragma once\n", "")
            return f"// ---- {m.group(1)} ----\n{body}// ---- end of {m.group(1)} ----"

        text = _LOCAL_INCLUDE.sub(splice, text)
        return "".join(f"#define {k} {v}\n" for k, v in self.defines.items()) + text

    def build_name(self, source: str) -> str:
        """``name`` plus a hash of the source and flags (and, for ``-march=native``, of the
        machine's instruction sets): each version of a kernel builds in a folder of its
        own, so checkouts of different versions never rebuild each other's, and a build
        cache shared between machines never hands one CPU another's binary."""
        parts = [source, *self.cflags, *parallel_flags()]
        if any("native" in f for f in self.cflags):
            parts.append(host_key())
        key = "\0".join(parts).encode()
        return f"{self.name}_{hashlib.sha256(key).hexdigest()[:10]}"

    def portable(self) -> InlineExtension | None:
        """The same kernel for the narrowest vector unit worth testing on this machine
        (``-march=native`` replaced by ``portable_march()``), under its own name; None
        where no such build is defined. Tests run it beside the native build."""
        march = portable_march()
        if march is None:
            return None
        flags = tuple(march if f == "-march=native" else f for f in self.cflags)
        return InlineExtension(f"{self.name}_portable", self.path, self.functions, flags,
                               self.defines)


@functools.cache
def parallel_flags() -> list[str]:
    """``-fopenmp`` where torch's own thread pool is OpenMP on Linux (its wheels ship
    ``libgomp.so.1``, which the kernels then share: the same threads, and
    ``torch.set_num_threads`` holds): ATen's ``at::parallel_for`` is a header that runs
    serially in code compiled without it. Nothing elsewhere (the kernels run on one
    thread there)."""
    import torch

    if platform.system() == "Linux" and getattr(torch._C, "has_openmp", False):
        return ["-fopenmp"]
    return []


@functools.cache
def host_key() -> str:
    """What ``-march=native`` compiles for: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def portable_march() -> str | None:
    """The ``-march`` of the narrowest vector build worth testing on this machine: AVX2
    on x86-64 (``x86-64-v3``), plain ARMv8 NEON on aarch64; None elsewhere."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "-march=x86-64-v3"
    if machine in ("aarch64", "arm64"):
        return "-march=armv8-a"
    return None


def clear_stale_lock(name: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build lock of extension ``name`` if it is older than ``max_age_s``
    (a build killed mid-way leaves it, and torch waits on it without end); returns
    whether one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:  # no lock: nobody is building
        return False
    if age <= max_age_s:
        return False
    log.warning("dyncompile: removing %s, left %.0f min ago by a build of %s that did not "
                "finish", lock, age / 60, name)
    try:
        os.remove(lock)
    except OSError:  # another process removed it first
        return False
    return True
