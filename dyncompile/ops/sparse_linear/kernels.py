"""sparse_linear's kernels, chosen per call: ``run_cpu`` and ``run_cuda``.

CPU: the C++ row-skipping kernel when it pays (few tokens, a sparse union of
active channels), else one dense GEMM on the masked input; the choice is made
per call from the actual mask. CUDA: the Triton kernel. Both also give what the
call skipped. No op is registered here: the gated form's ops
(``dyncompile::gated_linear``, ``dyncompile::cats_glu``) call these with the
threshold for the budget in force.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cpu import KERNEL_DTYPES, sparse_linear_cpu
from .reference import score

# Row skipping beats a dense GEMM only in the decode regime: few tokens, and
# a union of active channels well below the full width.
SPARSE_MAX_TOKENS = 16
SPARSE_MAX_ACTIVE = 0.85
# Up to this many tokens the row walk over an input-major weight beats a GEMM
# even with every row active (measured: 4 tokens, 768 -> 3072, 0.6 of F.linear's time).
SPARSE_ALWAYS_TOKENS = 8


# With an engine's own dense kernel (vLLM's prepacked oneDNN GEMM) the walk pays only below
# a union fraction that shrinks with the tokens: walking every row costs about 0.95x that
# GEMM at 1 token, 1.15x at 2, 1.4-1.6x at 4 and 1.5-2x at 8 (measured, fp32, 1 thread,
# 1536 -> 8192, 4096 -> 1536, 1536 -> 2048). (tokens up to, largest union fraction)
ENGINE_WALK_LIMITS = ((1, 1.0), (2, 0.8), (4, 0.6), (8, 0.5), (SPARSE_MAX_TOKENS, 0.3))


def _engine_walk_limit(n: int) -> float:
    return next(u for t, u in ENGINE_WALK_LIMITS if n <= t)


# Dense kernels an engine already holds for a weight (e.g. a GEMM on weights it prepacked),
# keyed by the weight's storage: calls that run dense use them instead of F.linear.
DenseKernel = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_DENSE: dict[tuple[int, int], DenseKernel] = {}


def _key(weight: torch.Tensor) -> tuple[int, int]:
    return weight.untyped_storage().data_ptr(), weight.numel()


def register_dense(weight: torch.Tensor, fn: DenseKernel) -> None:
    """Use ``fn(x, bias)`` (= ``F.linear(x, weight, bias)``) for dense calls on ``weight``
    (or any view of its storage, e.g. the transposed weight the forms pass); dropped with
    the weight (``fn`` must not hold ``weight`` itself, or neither is ever freed)."""
    key = _key(weight)
    _DENSE[key] = fn
    weakref.finalize(weight, _DENSE.pop, key, None)


def dense_linear(x: torch.Tensor, weight_t: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight_t + bias`` through the weight's registered dense kernel, if any."""
    fn = _DENSE.get(_key(weight_t)) if _DENSE else None
    return fn(x, bias) if fn is not None else F.linear(x, weight_t.t(), bias)


def run_cpu(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
            thr: float | torch.Tensor, scale: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, float, float]:
    """The CPU kernel with a threshold on ``|x| * scale``: ``(y, FLOPs skipped, kept
    (token, channel) pairs)``. ``thr`` is a Python float, or an fp32 tensor of one
    threshold per token (row of ``x`` flattened to 2-D)."""
    n_in, n_out = weight_t.shape
    x2 = x.reshape(-1, n_in)
    n = x2.shape[0]
    dense = 2.0 * n * n_in * n_out
    if isinstance(thr, torch.Tensor):
        if thr.numel() != n:
            raise ValueError(f"sparse_linear: {thr.numel()} row thresholds for {n} rows")
        on = float(thr.max()) > 0 if n else False
        per_row = thr.float().reshape(-1, 1)
    else:
        on, per_row = thr > 0, thr
    if not on or n == 0 or x.dtype not in KERNEL_DTYPES:
        mask = score(x2, scale) >= per_row if on else None
        y = dense_linear(x2 * mask if mask is not None else x2, weight_t, bias)
        pairs = n * n_in if mask is None else float(mask.sum())
        spent = dense
    else:
        fn = _DENSE.get(_key(weight_t)) if _DENSE else None
        if fn is None:
            limit, always = SPARSE_MAX_ACTIVE, SPARSE_ALWAYS_TOKENS
        else:
            limit, always = (_engine_walk_limit(n), 1) if n <= SPARSE_MAX_TOKENS else (0.0, 0)
        y, k, pairs, skipped = sparse_linear_cpu(x2, weight_t, bias, thr, SPARSE_MAX_TOKENS,
                                                 limit, always, scale, fn)
        spent = 2.0 * n * k * n_out if skipped else dense
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out), dense - spent, float(pairs)


def run_cuda(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
             thr: float | torch.Tensor, count: bool = True, scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, float, float]:  # pragma: no cover - needs a GPU
    """The Triton kernel with a Python float threshold: ``(y, FLOPs skipped, kept pairs)``
    (with ``count``; reading the count back syncs once per call). With one threshold per
    row (a tensor) the masked input goes through one dense GEMM (nothing skipped)."""
    from .triton import sparse_linear_triton

    n_in, n_out = weight_t.shape
    n = x.numel() // n_in
    if isinstance(thr, torch.Tensor):
        x2 = x.reshape(-1, n_in)
        mask = score(x2, scale) >= thr.to(x.device, torch.float32).reshape(-1, 1)
        y = F.linear(x2 * mask, weight_t.t(), bias).reshape(*x.shape[:-1], n_out)
        return y, 0.0, float(mask.sum()) if count else float(n * n_in)
    kept = float(n * n_in)
    if thr > 0 and count:
        kept = float((score(x, scale) >= thr).sum())
    return (sparse_linear_triton(x, weight_t, bias, thr, scale=scale),
            2.0 * n * n_out * (n_in - kept),
            kept)
