"""Registration of ``torch.ops.dyncompile.gated_linear``.

One opaque op per linear: the threshold lookup and the sparse kernel run in a
single dispatch (the per-call overhead matters in the decode regime, where a
linear takes tens of microseconds). The kernels are sparse_linear's.
"""

from __future__ import annotations

import torch

from ...runtime.thresholds import lookup, peek
from ..sparse_linear import op as _sparse
from .reference import gated_linear_reference


@torch.library.custom_op("dyncompile::gated_linear", mutates_args=())
def gated_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                 state_id: int, site: str) -> torch.Tensor:
    """``sparse_linear(x, weight_t, bias, threshold(site, budget in force))``."""
    return gated_linear_reference(x, weight_t, bias, state_id, site)


@gated_linear.register_fake
def _(x, weight_t, bias, state_id, site):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


@gated_linear.register_kernel("cpu")
def _cpu(x, weight_t, bias, state_id, site):
    return _sparse.run_cpu(x, weight_t, bias, lookup(state_id, site, x))


@gated_linear.register_kernel("cuda")
def _cuda(x, weight_t, bias, state_id, site):  # pragma: no cover - needs a GPU
    return _sparse.run_cuda(x, weight_t, bias, lookup(state_id, site, x))


def _setup_context(ctx, inputs, output):
    x, weight_t, bias, state_id, site = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.threshold = peek(state_id, site)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight_t = ctx.saved_tensors
    mask = x.abs() >= ctx.threshold
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = (grad @ weight_t.t()) * mask
    grad_w = (x * mask).reshape(-1, x.shape[-1]).t() @ g2
    grad_b = g2.sum(0) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None


gated_linear.register_autograd(_backward, setup_context=_setup_context)
