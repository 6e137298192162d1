"""Semantics of expert_route.

    calibrating:  record x for the site; every expert runs (the dense FFN)
    budget 1.0:   every expert runs (the dense FFN, no router call)
    otherwise:    r = router(x) (predicted output norm per expert);
                  tau = the site's tau for the budget (from its compute curve);
                  mask[t, e] = r[t, e] >= tau * max_e r[t, e]

Returns a bool mask [N, E] over the flattened tokens. The router and the
curve live in the model's runtime state (the expert form's), read at call
time, so a new budget never recompiles.
"""

from __future__ import annotations

import torch

from ...runtime.budget import get_state

FORM = "expert"


def expert_route_reference(x: torch.Tensor, state_id: int, site: str,
                           experts: int) -> torch.Tensor:
    state = get_state(state_id)
    runtime = state.forms[FORM]
    x2 = x.reshape(-1, x.shape[-1])
    if state.calibrating:
        runtime.observe(site, x2)
        return torch.ones(x2.shape[0], experts, dtype=torch.bool, device=x.device)
    if state.value >= 1.0:
        return torch.ones(x2.shape[0], experts, dtype=torch.bool, device=x.device)
    return runtime.route(site, x2, state.value)
