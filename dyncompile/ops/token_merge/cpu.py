"""CPU kernels of token_merge and token_unmerge (C++).

The merge adds each token's size-weighted row into its slot and divides by the
summed sizes, over (row, column block) work items so a single row still uses every
thread; the unmerge copies one row per (row, token). Plain loops the compiler
vectorizes for the host, so one source serves AVX2, AVX-512 and ARM. Built with
``-fopenmp``: without it ``at::parallel_for`` in the extension runs serially.
``kernel_available()`` registers the native build's functions as the ops' CPU kernels.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

from ..cpp_extension import InlineExtension

_EXT = InlineExtension("dyncompile_token_merge_v1", Path(__file__).with_name("token_merge.cpp"),
                       ["token_merge_cpu", "token_unmerge_cpu"],
                       ("-O3", "-march=native", "-fopenmp"))
_REGISTERED: list[ModuleType] = []
_LOCK = threading.Lock()


def module() -> ModuleType | None:
    """The built extension (``token_merge_cpu``, ``token_unmerge_cpu``), or None."""
    return _EXT.load()


def kernel_available() -> bool:
    """Build (once) and register the C++ kernels as the CPU kernels of the ops; False
    without a compiler."""
    from . import op

    with _LOCK:
        if _REGISTERED:
            return True
        mod = _EXT.load()
        if mod is None:
            return False
        op.register_cpu(mod.token_merge_cpu, mod.token_unmerge_cpu)
        _REGISTERED.append(mod)
    return True
