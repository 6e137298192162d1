"""Registration of ``torch.ops.dyncompile.cats_glu``.

The threshold is the gated form's run-time threshold for ``site`` (on ``|a|``),
so the budget changes per call without recompiling. CPU: the C++ kernel when
few tokens keep a sparse union of channels, else two dense GEMMs on the masked
activations. CUDA: dense up projection, then sparse_linear's Triton kernel for
the down projection (rows of dropped channels are never read).
"""

from __future__ import annotations

import torch

from ...runtime import stats as _stats
from ...runtime.thresholds import lookup
from ..sparse_linear.op import SPARSE_MAX_ACTIVE, SPARSE_MAX_TOKENS
from .cpu import cats_glu_cpu
from .reference import cats_glu_reference


def _value(a, x, w_up, b_up):
    u = torch.nn.functional.linear(x, w_up, b_up)
    return a * u


@torch.library.custom_op("dyncompile::cats_glu", mutates_args=())
def cats_glu(a: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
             w_down_t: torch.Tensor, b_down: torch.Tensor | None, state_id: int,
             site: str) -> torch.Tensor:
    """``((a * (|a| >= thr)) * (x @ w_up.T + b_up)) @ w_down_t + b_down``; thr from the budget."""
    thr = lookup(state_id, site, a, _value(a, x, w_up, b_up) if _calibrating(state_id) else None)
    return cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, thr)


@cats_glu.register_fake
def _(a, x, w_up, b_up, w_down_t, b_down, state_id, site):
    return a.new_empty(*a.shape[:-1], w_down_t.shape[1])


def _record(n: int, d: int, hid: int, out: int, pairs: float, spent: float) -> None:
    dense = 2.0 * n * hid * (d + out)
    _stats.record_ratio("active_channels", pairs, n * hid)
    _stats.record_saving(dense - spent)


@cats_glu.register_kernel("cpu")
def _cpu(a, x, w_up, b_up, w_down_t, b_down, state_id, site):
    hid, d = w_up.shape
    out = w_down_t.shape[1]
    a2, x2 = a.reshape(-1, hid), x.reshape(-1, d)
    n = a2.shape[0]
    thr = lookup(state_id, site, a, _value(a, x, w_up, b_up) if _calibrating(state_id) else None)
    if thr <= 0 or n == 0:
        y = cats_glu_reference(a2, x2, w_up, b_up, w_down_t, b_down, 0.0)
        _record(n, d, hid, out, n * hid, 2.0 * n * hid * (d + out))
    else:
        y, k, pairs, sparse = cats_glu_cpu(a2, x2, w_up, b_up, w_down_t, b_down, thr,
                                           SPARSE_MAX_TOKENS, SPARSE_MAX_ACTIVE)
        spent = 2.0 * pairs * (d + out) if sparse else 2.0 * n * hid * (d + out)
        _record(n, d, hid, out, pairs, spent)
    return y.to(a.dtype).reshape(*a.shape[:-1], out)


@cats_glu.register_kernel("cuda")
def _cuda(a, x, w_up, b_up, w_down_t, b_down, state_id, site):  # pragma: no cover - GPU
    from ..sparse_linear.triton import sparse_linear_triton

    hid, d = w_up.shape
    out = w_down_t.shape[1]
    n = a.numel() // hid
    u = torch.nn.functional.linear(x, w_up, b_up)
    thr = lookup(state_id, site, a, a * u if _calibrating(state_id) else None)
    if thr <= 0:
        return cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, 0.0)
    mask = a.abs() >= thr
    h = a * mask * u
    pairs = float(mask.sum())
    _record(n, d, hid, out, pairs, 2.0 * n * hid * d + 2.0 * pairs * out)
    # Dropped channels are exact zeros in h: the smallest positive threshold skips them.
    return sparse_linear_triton(h, w_down_t, b_down, torch.finfo(torch.float32).tiny)


def _calibrating(state_id: int) -> bool:
    from ...runtime.budget import get_state

    return get_state(state_id).calibrating
