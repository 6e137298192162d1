"""Registration of ``torch.ops.dyncompile.expert_route`` (one Python kernel, any device).

Opaque to the compiler: the router and tau are runtime state. The router's
FLOPs are reported to the stats as spent work (the budget includes them).

Defined with ``torch.library.Library`` rather than ``custom_op``: the mask is a
bool tensor (nothing to differentiate), so the kernel is registered once for
every backend (CompositeExplicitAutograd) and a call reaches it from the
dispatcher directly, without custom_op's Python autograd layers (which cost
tens of microseconds per call between a model's kernels).
"""

from __future__ import annotations

import torch

from .reference import expert_route_reference

_LIB = torch.library.Library("dyncompile", "FRAGMENT")
_LIB.define("expert_route(Tensor x, int state_id, str site, int experts) -> Tensor")


def expert_route(x: torch.Tensor, state_id: int, site: str, experts: int) -> torch.Tensor:
    """Bool mask [N, E]: expert e runs for token t (dynamic-k under the budget in force)."""
    return expert_route_reference(x, state_id, site, experts)


_LIB.impl("expert_route", expert_route, "CompositeExplicitAutograd")


@torch.library.register_fake("dyncompile::expert_route")
def _(x, state_id, site, experts):
    return x.new_empty((x.numel() // x.shape[-1], experts), dtype=torch.bool)
