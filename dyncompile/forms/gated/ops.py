"""The gated form's ops: ``dyncompile::gated_linear`` and ``dyncompile::cats_glu``.

Thin glue over the pure kernels in ``dyncompile.ops``: each op reads its site's
threshold for the budget in force from the model's runtime state (so a new
budget never recompiles), runs the kernel, and reports what the call skipped
to the call's stats. One opaque op per linear: the threshold lookup and the
sparse kernel run in a single dispatch (the per-call overhead matters in the
decode regime, where a linear takes tens of microseconds).

While the model is calibrating, the ops record their inputs for the site and
run the dense product (threshold 0). Budget 1.0 gives threshold 0: dense.
"""

from __future__ import annotations

import torch

from ...core import stats as _stats
from ...core.budget import get_state
from ...ops.cats_glu.cpu import cats_glu_cpu
from ...ops.cats_glu.reference import cats_glu_reference
from ...ops.sparse_linear import kernels as _sparse
from ...ops.sparse_linear.reference import score, sparse_linear_reference
from .thresholds import lookup, peek, scale_of

# ---------------------------------------------------------------------- gated_linear


def gated_linear_reference(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                           state_id: int, site: str) -> torch.Tensor:
    """``sparse_linear(x, weight_t, bias, threshold of site for the budget in force)``
    (per token row with per-row budgets in force)."""
    thr = lookup(state_id, site, x, rows=True)
    return sparse_linear_reference(x, weight_t, bias, thr, scale_of(state_id, site))


# Registered through ``torch.library.Library`` rather than ``custom_op``: the op runs
# once per linear per decode step, and custom_op's wrappers (autograd, dynamo-disable)
# cost about 8 us a call, a tenth of a small linear's time.
_LIB = torch.library.Library("dyncompile", "FRAGMENT")
_LIB.define("gated_linear(Tensor x, Tensor weight_t, Tensor? bias, int state_id, str site) "
            "-> Tensor")
gated_linear = torch.ops.dyncompile.gated_linear.default


@torch.library.register_fake("dyncompile::gated_linear", lib=_LIB)
def _(x, weight_t, bias, state_id, site):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def _gated_cpu(x, weight_t, bias, state_id, site):
    thr = lookup(state_id, site, x, rows=True)
    # dense: nothing skipped, every channel active
    if not isinstance(thr, torch.Tensor) and thr <= 0:
        _stats.record_op(0.0, ("active_channels", x.numel(), x.numel()))
        return _sparse.dense_linear(x, weight_t, bias)
    y, saving, pairs = _sparse.run_cpu(x, weight_t, bias, thr, scale_of(state_id, site))
    # each token alone would walk only its own active rows
    _stats.record_op(saving, ("active_channels", pairs, x.numel()),
                     token_saving=2.0 * weight_t.shape[1] * (x.numel() - pairs))
    return y


def _gated_cuda(x, weight_t, bias, state_id, site):  # pragma: no cover - needs a GPU
    thr = lookup(state_id, site, x, rows=True)
    on = isinstance(thr, torch.Tensor) or thr > 0
    y, saving, pairs = _sparse.run_cuda(x, weight_t, bias, thr, count=on,
                                        scale=scale_of(state_id, site))
    if on:
        _stats.record_op(saving, ("active_channels", pairs, x.numel()))
    return y


_LIB.impl("gated_linear", _gated_cpu, "CPU")
_LIB.impl("gated_linear", _gated_cuda, "CUDA")


def _gated_setup_context(ctx, inputs, output):
    x, weight_t, bias, state_id, site = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.threshold = peek(state_id, site)
    ctx.scale = scale_of(state_id, site)
    ctx.has_bias = bias is not None


def _gated_backward(ctx, grad):
    x, weight_t = ctx.saved_tensors
    mask = score(x, ctx.scale) >= ctx.threshold
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = (grad @ weight_t.t()) * mask
    grad_w = (x * mask).reshape(-1, x.shape[-1]).t() @ g2
    grad_b = g2.sum(0) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None


torch.library.register_autograd("dyncompile::gated_linear", _gated_backward,
                                setup_context=_gated_setup_context, lib=_LIB)

# -------------------------------------------------------------------------- cats_glu


def _value(a, x, w_up, b_up):
    u = torch.nn.functional.linear(x, w_up, b_up)
    return a * u


def _calibrating(state_id: int) -> bool:
    return get_state(state_id).calibrating


@torch.library.custom_op("dyncompile::cats_glu", mutates_args=())
def cats_glu(a: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
             w_down_t: torch.Tensor, b_down: torch.Tensor | None, state_id: int,
             site: str) -> torch.Tensor:
    """``((a * (|a| >= thr)) * (x @ w_up.T + b_up)) @ w_down_t + b_down``; thr from the budget.

    The threshold is on ``|a|`` (the gate activation). CPU: the C++ kernel when few
    tokens keep a sparse union of channels, else two dense GEMMs on the masked
    activations. CUDA: dense up projection, then sparse_linear's Triton kernel for the
    down projection (rows of dropped channels are never read).
    """
    thr = lookup(state_id, site, a, _value(a, x, w_up, b_up) if _calibrating(state_id) else None)
    return cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, thr)


@cats_glu.register_fake
def _(a, x, w_up, b_up, w_down_t, b_down, state_id, site):
    return a.new_empty(*a.shape[:-1], w_down_t.shape[1])


def _record(n: int, d: int, hid: int, out: int, pairs: float, spent: float) -> None:
    dense = 2.0 * n * hid * (d + out)
    _stats.record_op(dense - spent, ("active_channels", pairs, n * hid),
                     token_saving=dense - 2.0 * pairs * (d + out))


@cats_glu.register_kernel("cpu")
def _cats_cpu(a, x, w_up, b_up, w_down_t, b_down, state_id, site):
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
                                           _sparse.SPARSE_MAX_TOKENS, _sparse.SPARSE_MAX_ACTIVE)
        spent = 2.0 * pairs * (d + out) if sparse else 2.0 * n * hid * (d + out)
        _record(n, d, hid, out, pairs, spent)
    return y.to(a.dtype).reshape(*a.shape[:-1], out)


@cats_glu.register_kernel("cuda")
def _cats_cuda(a, x, w_up, b_up, w_down_t, b_down, state_id, site):  # pragma: no cover - GPU
    from ...ops.sparse_linear.triton import sparse_linear_triton

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
