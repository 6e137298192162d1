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
           value: torch.Tensor | None = None, rows: bool = False) -> float | torch.Tensor:
    """Threshold on ``|gate|`` for ``site``; records ``gate`` (and ``value``) when calibrating.

    With ``rows`` and per-row budgets in force for the call (``BudgetState.rows``, one
    per row of ``gate`` flattened to 2-D), an fp32 tensor of one threshold per row.
    """
    state = get_state(state_id)
    runtime = state.forms[FORM]
    if state.calibrating:
        runtime.observe(site, gate, value)
        return 0.0
    if rows and state.rows is not None:
        knobs = state.row_knobs(FORM)
        if knobs is not None and state.rows.index.numel() * gate.shape[-1] == gate.numel():
            levels = torch.tensor([runtime.threshold(site, k) for k in knobs],
                                  dtype=torch.float32)
            return levels[state.rows.index]
    return runtime.threshold(site, state.knob(FORM))


def scale_of(state_id: int, site: str) -> torch.Tensor | None:
    """The per-channel factor of ``|x|`` in ``site``'s criterion (None: plain ``|x|``)."""
    return get_state(state_id).forms[FORM].scales.get(site)


def peek(state_id: int, site: str) -> float:
    """The threshold in force, without recording anything (for backward)."""
    state = get_state(state_id)
    return 0.0 if state.calibrating else state.forms[FORM].threshold(site, state.knob(FORM))
