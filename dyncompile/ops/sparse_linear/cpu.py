"""CPU kernel: accumulate only the weight rows of active input channels.

Weights in fp32, bf16 or fp16, summed in fp32 (the output in the input's dtype).
The loops are plain C++ that the compiler vectorizes for the machine it builds on
(AVX2, AVX-512, NEON or SVE), so every CPU gets the same kernel.

For few tokens (the decode regime) a C++ kernel walks the union of active
channels once and adds ``x[t, i] * W_t[i, :]`` into each token's output, with
torch's thread pool splitting the active rows (private accumulators, no weight copy). It is
built on first use with ``torch.utils.cpp_extension.load_inline`` (cached
after); if no compiler is available a torch fallback gathers the active rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..cpp_extension import InlineExtension

_EXT = InlineExtension("dyncompile_sparse_linear_v10",
                       Path(__file__).with_name("sparse_linear.cpp"), ["sparse_linear_fwd"],
                       ("-O3", "-march=native"))



_NONE = torch.empty(0)  # an absent bias or scale, as the C++ signature takes it

# Weight and input dtypes the C++ kernel takes (the sum is always fp32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sparse_linear_cpu(x2d: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                      threshold: float | torch.Tensor, max_tokens: int, max_active: float,
                      rows_always: int = 0, scale: torch.Tensor | None = None,
                      dense: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
                      | None = None) -> tuple[torch.Tensor, int, int, bool]:
    """(y, union of active channels, active (token, channel) pairs, rows skipped?).

    Skips rows when there are at most ``max_tokens`` tokens and the union of
    active channels is at most ``max_active`` of the width (or there are at
    most ``rows_always`` tokens, where walking the rows beats a GEMM even when
    all are active); otherwise runs one dense GEMM on the masked input: ``dense(kept,
    bias)`` if given (an engine's own kernel for this weight), else torch's. With ``scale``
    (fp32, one per input channel) a channel is active where ``|x| * scale >= threshold``.
    ``threshold`` may be a tensor of one threshold per token (row of ``x2d``).
    """
    rows = threshold if isinstance(threshold, torch.Tensor) else None
    mod = _EXT.load() if x2d.dtype in KERNEL_DTYPES and weight_t.dtype in KERNEL_DTYPES else None
    if mod is not None:
        y, k, pairs, sparse = mod.sparse_linear_fwd(
            x2d, weight_t, bias if bias is not None else _NONE,
            scale if scale is not None else _NONE, 0.0 if rows is not None else threshold,
            max_tokens, max_active, rows_always, dense is None,
            rows.float() if rows is not None else _NONE)
        if not sparse and dense is not None:
            y = dense(y.to(weight_t.dtype), bias).to(x2d.dtype)
        return y, int(k), int(pairs), bool(sparse)
    thr = rows.float().reshape(-1, 1) if rows is not None else threshold
    mask = (x2d.abs().float() * scale if scale is not None else x2d.abs().float()) >= thr
    on = mask.any(0)
    k, pairs = int(on.sum()), int(mask.sum())
    kept = (x2d * mask).to(weight_t.dtype)
    if x2d.shape[0] <= max_tokens and (k <= max_active * x2d.shape[1]
                                       or x2d.shape[0] <= rows_always):
        idx = on.nonzero().flatten()
        y = kept.index_select(1, idx).float() @ weight_t.index_select(0, idx).float()
        y = y + bias.float() if bias is not None else y
        return y.to(x2d.dtype), k, pairs, True
    y = (dense(kept, bias) if dense is not None
         else torch.nn.functional.linear(kept, weight_t.t(), bias))
    return y.to(x2d.dtype), k, pairs, False


def kernel_available() -> bool:
    return _EXT.available()
