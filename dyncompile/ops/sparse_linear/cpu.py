"""CPU kernel: accumulate only the weight rows of active input channels.

For few tokens (the decode regime) a C++ kernel walks the union of active
channels once and adds ``x[t, i] * W_t[i, :]`` into each token's output, with
torch's thread pool splitting the active rows (private accumulators, no weight copy). It is
built on first use with ``torch.utils.cpp_extension.load_inline`` (cached
after); if no compiler is available a torch fallback gathers the active rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cpp_extension import InlineExtension

_EXT = InlineExtension("dyncompile_sparse_linear_v6",
                       Path(__file__).with_name("sparse_linear.cpp"), ["sparse_linear_fwd"],
                       ("-O3", "-march=native"))



def sparse_linear_cpu(x2d: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                      threshold: float, max_tokens: int, max_active: float,
                      rows_always: int = 0) -> tuple[torch.Tensor, int, int, bool]:
    """(y, union of active channels, active (token, channel) pairs, rows skipped?).

    Skips rows when there are at most ``max_tokens`` tokens and the union of
    active channels is at most ``max_active`` of the width (or there are at
    most ``rows_always`` tokens, where walking the rows beats a GEMM even when
    all are active); otherwise runs one dense GEMM on the masked input.
    """
    mod = _EXT.load() if x2d.dtype == torch.float32 and weight_t.dtype == torch.float32 else None
    if mod is not None:
        y, k, pairs, sparse = mod.sparse_linear_fwd(
            x2d, weight_t, bias if bias is not None else torch.empty(0), threshold,
            max_tokens, max_active, rows_always)
        return y, int(k), int(pairs), bool(sparse)
    mask = x2d.abs() >= threshold
    on = mask.any(0)
    k, pairs = int(on.sum()), int(mask.sum())
    if x2d.shape[0] <= max_tokens and (k <= max_active * x2d.shape[1]
                                       or x2d.shape[0] <= rows_always):
        idx = on.nonzero().flatten()
        y = (x2d * mask).index_select(1, idx) @ weight_t.index_select(0, idx)
        y = y + bias if bias is not None else y
        return y, k, pairs, True
    return torch.nn.functional.linear(x2d * mask, weight_t.t(), bias), k, pairs, False


def kernel_available() -> bool:
    return _EXT.available()
