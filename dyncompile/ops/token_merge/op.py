"""Registration of the token ops: ``torch.ops.dyncompile.token_match``, ``token_assign``,
``token_merge``, ``token_unmerge``.

Defined with ``torch.library.Library``: the references are registered for every
backend (CompositeExplicitAutograd); ``cpu.kernel_available()`` adds the C++ CPU
kernels of merge and unmerge, and on CUDA they take the Triton kernels. Matching
is a batched matrix product and a row max (BLAS / cuBLAS through torch), the
assignment a sort: their references are their kernels.
"""

from __future__ import annotations

import torch

from .reference import assign_reference, match_reference, merge_reference, unmerge_reference

_LIB = torch.library.Library("dyncompile", "FRAGMENT")
_LIB.define("token_match(Tensor metric, Tensor group, bool protect_first) -> (Tensor, Tensor)")
_LIB.define("token_assign(Tensor best, Tensor partner, int r, int tokens) -> (Tensor, Tensor)")
_LIB.define("token_merge(Tensor x, Tensor size, Tensor slot, int n_out) -> (Tensor, Tensor)")
_LIB.define("token_unmerge(Tensor x, Tensor index) -> Tensor")
_LIB.impl("token_match", match_reference, "CompositeExplicitAutograd")
_LIB.impl("token_assign", assign_reference, "CompositeExplicitAutograd")
_LIB.impl("token_merge", merge_reference, "CompositeExplicitAutograd")
_LIB.impl("token_unmerge", unmerge_reference, "CompositeExplicitAutograd")


def _merge_cuda(x, size, slot, n_out):
    from .triton import token_merge

    return token_merge(x, size, slot, n_out)


def _unmerge_cuda(x, index):
    from .triton import token_unmerge

    return token_unmerge(x, index)


_LIB.impl("token_merge", _merge_cuda, "CUDA")
_LIB.impl("token_unmerge", _unmerge_cuda, "CUDA")


@torch.library.register_fake("dyncompile::token_match")
def _(metric, group, protect_first):
    rows, tokens = metric.shape[0], metric.shape[1]
    na = (tokens + 1) // 2
    return (metric.new_empty((rows, na), dtype=torch.float32),
            metric.new_empty((rows, na), dtype=torch.long))


@torch.library.register_fake("dyncompile::token_assign")
def _(best, partner, r, tokens):
    rows = best.shape[0]
    return (best.new_empty((rows, tokens), dtype=torch.long),
            best.new_empty((rows, tokens - r), dtype=torch.long))


@torch.library.register_fake("dyncompile::token_merge")
def _(x, size, slot, n_out):
    return (x.new_empty((x.shape[0], n_out, x.shape[2])),
            x.new_empty((x.shape[0], n_out), dtype=torch.float32))


@torch.library.register_fake("dyncompile::token_unmerge")
def _(x, index):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


def register_cpu(merge, unmerge) -> None:
    """Make ``merge`` / ``unmerge`` (the C++ kernels) the ops' CPU kernels."""
    _LIB.impl("token_merge", merge, "CPU")
    _LIB.impl("token_unmerge", unmerge, "CPU")
