"""Registration of ``torch.ops.dyncompile.token_mean``.

Defined with ``torch.library.Library``: the reference is registered for every
backend (CompositeExplicitAutograd), and ``cpu.kernel_available()`` adds the
serial C++ CPU kernel, which the dispatcher then prefers on CPU tensors.
"""

from __future__ import annotations

import torch

from .reference import token_mean_reference

_LIB = torch.library.Library("dyncompile", "FRAGMENT")
_LIB.define("token_mean(Tensor x) -> Tensor")
_LIB.impl("token_mean", token_mean_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("dyncompile::token_mean")
def _(x):
    return x.new_empty((x.shape[0], x.shape[-1]), dtype=torch.float32)
