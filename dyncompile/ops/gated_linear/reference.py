"""Semantics of gated_linear: one op per rewritten linear.

    thr = threshold of ``site`` for the budget in force (0 while calibrating)
    y   = sparse_linear(x, weight_t, bias, thr)

While the model is calibrating the op records ``|x|`` for its site and runs
the dense linear. Budget 1.0 gives threshold 0: the dense linear.
"""

from __future__ import annotations

import torch

from ...runtime.thresholds import lookup
from ..sparse_linear.reference import sparse_linear_reference


def gated_linear_reference(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                           state_id: int, site: str) -> torch.Tensor:
    return sparse_linear_reference(x, weight_t, bias, lookup(state_id, site, x))
