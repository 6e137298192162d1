"""C++ CPU kernels built on first use with ``torch.utils.cpp_extension.load_inline``.

Each op's ``cpu.py`` declares one ``InlineExtension``; the build happens once
per process (cached on disk after the first time), and if no compiler is
available a warning is logged once and ``load()`` returns None so the op takes
its torch path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import ModuleType

log = logging.getLogger("dyncompile")

# A build lock older than this was left by a build that was killed (the kernels build
# in well under a minute): left in place, every later load would wait on it forever.
STALE_LOCK_S = 15 * 60

# C++ helpers shared by the ops' kernels: spliced into a kernel's source after its
# includes (``<torch/extension.h>`` brings the integer types). DOT4's ``omp simd``
# reduction vectorises only when the kernel is built with ``-fopenmp`` or
# ``-fopenmp-simd``: with the default flags GCC keeps the four sums scalar (a 384x384
# matrix-vector product measured 39 us warm instead of 10.5 us on the 2-core CPU).
DOT4 = r"""
// s[q] = w[q] . x for four weight rows (x loaded once, four independent sums).
static inline void dot4(const float* const* w, const float* x, int64_t n, float* s) {
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  #pragma omp simd reduction(+:s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    s0 += w0[i] * xi; s1 += w1[i] * xi; s2 += w2[i] * xi; s3 += w3[i] * xi;
  }
  s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3;
}
"""


class InlineExtension:
    """A lazily built C++ extension: ``load()`` gives the module or None."""

    def __init__(self, name: str, source: str, functions: list[str],
                 cflags: tuple[str, ...] = ("-O3", "-march=native")) -> None:
        self.name, self.source, self.functions, self.cflags = name, source, functions, cflags
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

                    clear_stale_lock(self.name)
                    os.environ.setdefault("MAX_JOBS", "2")
                    self._module = load_inline(
                        name=self.name, cpp_sources=[self.source], functions=self.functions,
                        extra_cflags=list(self.cflags), verbose=False)
                except Exception as e:  # noqa: BLE001  (no compiler: the op's torch path)
                    log.warning("dyncompile: C++ kernel %s unavailable (%s); using the torch "
                                "path", self.name, e)
                    self._failed = True
        return self._module

    def available(self) -> bool:
        return self.load() is not None


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
