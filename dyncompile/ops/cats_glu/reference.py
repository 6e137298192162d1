"""Semantics of cats_glu (the CATS variant of the gated form, for GLU FFNs).

Given ``a = act(gate(x))`` (computed densely by the graph) and the FFN input ``x``:

    m = |a| >= threshold
    y = ((a * m) * (x @ w_up.T + b_up)) @ w_down_t + b_down

Hidden channels whose gate activation is small are dropped, so their row of
the up projection ([H, D], row = hidden channel) and of the down projection
(input-major [H, D_out]) are never read. Threshold 0 is the dense FFN.
"""

from __future__ import annotations

import torch


def cats_glu_reference(a: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor | None, w_down_t: torch.Tensor,
                       b_down: torch.Tensor | None, threshold: float) -> torch.Tensor:
    f32 = torch.float32
    am = a.to(f32) * (a.abs() >= threshold) if threshold > 0 else a.to(f32)
    u = x.to(f32) @ w_up.to(f32).t()
    if b_up is not None:
        u = u + b_up.to(f32)
    y = (am * u) @ w_down_t.to(f32)
    if b_down is not None:
        y = y + b_down.to(f32)
    return y.to(a.dtype)
