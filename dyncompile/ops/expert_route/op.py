"""Registration of ``torch.ops.dyncompile.expert_route`` (one Python kernel, any device).

Opaque to the compiler: the router and tau are runtime state. The router's
FLOPs are reported to the stats as spent work (the budget includes them).
"""

from __future__ import annotations

import torch

from .reference import expert_route_reference


@torch.library.custom_op("dyncompile::expert_route", mutates_args=())
def expert_route(x: torch.Tensor, state_id: int, site: str, experts: int) -> torch.Tensor:
    """Bool mask [N, E]: expert e runs for token t (dynamic-k under the budget in force)."""
    return expert_route_reference(x, state_id, site, experts)


@expert_route.register_fake
def _(x, state_id, site, experts):
    return x.new_empty((x.numel() // x.shape[-1], experts), dtype=torch.bool)
