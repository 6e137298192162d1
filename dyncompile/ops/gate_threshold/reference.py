"""Semantics of gate_threshold.

While the model's BudgetState is calibrating, record ``|x|`` for the site and
return 0 (the dense path). Otherwise return the site's threshold for the budget
in force: ``thresholds[site]`` interpolated at sparsity ``1 - budget`` (a table
over a sparsity grid, fitted from the calibration sample). Budget 1.0 gives 0.
"""

from __future__ import annotations

import torch


def interpolate(levels: torch.Tensor, values: torch.Tensor, at: float) -> float:
    """Piecewise-linear interpolation of values(levels) at ``at`` (clamped)."""
    at = min(max(at, float(levels[0])), float(levels[-1]))
    pos = torch.searchsorted(levels, torch.tensor(at, dtype=levels.dtype))
    hi = int(pos.clamp(1, len(levels) - 1))
    lo = hi - 1
    span = float(levels[hi] - levels[lo])
    w = (at - float(levels[lo])) / span if span > 0 else 0.0
    return float(values[lo]) * (1 - w) + float(values[hi]) * w
