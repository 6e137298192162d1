"""CPU kernel of token_mean: one thread, for the small streams a fused exit check reads.

An exit check that compares exit 1 with the exit-0 state needs that state's token
mean inside the fused check graph. Left to Inductor, the reduction lands in the
check's tail kernel and makes it parallel: on one 128-token row, waking the
second thread there costs more than the sum itself (about 200 us of the check,
against about 100 us for the other exits). This kernel sums the rows serially
while they are still in cache; larger inputs (more than ``SERIAL_MAX`` values)
take torch's parallel mean. Registered with the dispatcher from C++ when it
builds, so a compiled graph reaches it without a Python frame.
"""

from __future__ import annotations

from pathlib import Path

from ..cpp_extension import InlineExtension

SERIAL_MAX = 1 << 18  # values; above this, torch's (parallel) mean

# SERIAL_MAX reaches the C++ as a #define ahead of token_mean.cpp.
_EXT = InlineExtension("dyncompile_token_mean_v1", Path(__file__).with_name("token_mean.cpp"),
                       ["token_mean_loaded"], ("-O3", "-march=native", "-fopenmp-simd"),
                       defines={"SERIAL_MAX": SERIAL_MAX})


def kernel_available() -> bool:
    """Build (once) and register the C++ kernel; False without a compiler."""
    from . import op as _op  # noqa: F401  (the schema is defined before the kernel loads)

    return _EXT.load() is not None
