"""Registration of ``torch.ops.dyncompile.gate_threshold`` (CPU and CUDA: same Python kernel).

The op is opaque to the compiler: it reads the budget and the calibrated tables
from the model's runtime state at call time, so a new budget never recompiles.
"""

from __future__ import annotations

import torch

from ...runtime.budget import get_state


@torch.library.custom_op("dyncompile::gate_threshold", mutates_args=())
def gate_threshold(x: torch.Tensor, state_id: int, site: str) -> torch.Tensor:
    """Threshold (0-d float32 CPU tensor) for ``site`` under the budget in force."""
    state = get_state(state_id)
    runtime = state.forms["gated"]
    if state.calibrating:
        runtime.observe(site, x)
        return torch.zeros((), dtype=torch.float32)
    return torch.tensor(runtime.threshold(site, state.value), dtype=torch.float32)


@gate_threshold.register_fake
def _(x, state_id, site):
    return torch.empty((), dtype=torch.float32, device="cpu")
