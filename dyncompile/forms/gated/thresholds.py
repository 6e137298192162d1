"""Run-time threshold lookup shared by the gated form's ops.

The ops receive the model's state id and their site name as graph constants;
the threshold for the budget in force is read here at call time, so a new
budget never recompiles. While the state is calibrating, the op's inputs are
recorded instead and the threshold is 0 (the dense path).
"""

from __future__ import annotations

import torch

from ...core.budget import get_state

FORM = "gated"


def lookup(state_id: int, site: str, gate: torch.Tensor,
           value: torch.Tensor | None = None) -> float:
    """Threshold on ``|gate|`` for ``site``; records ``gate`` (and ``value``) when calibrating."""
    state = get_state(state_id)
    runtime = state.forms[FORM]
    if state.calibrating:
        runtime.observe(site, gate, value)
        return 0.0
    return runtime.threshold(site, state.knob(FORM))


def scale_of(state_id: int, site: str) -> torch.Tensor | None:
    """The per-channel factor of ``|x|`` in ``site``'s criterion (None: plain ``|x|``)."""
    return get_state(state_id).forms[FORM].scales.get(site)


def peek(state_id: int, site: str) -> float:
    """The threshold in force, without recording anything (for backward)."""
    state = get_state(state_id)
    return 0.0 if state.calibrating else state.forms[FORM].threshold(site, state.knob(FORM))
