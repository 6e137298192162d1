"""Activation statistics gathered while calibration batches run through the graph."""

from __future__ import annotations

import torch


class MagnitudeSample:
    """A bounded, seeded sample of |x| values for one site, for quantiles.

    Keeps at most ``capacity`` values: each batch contributes a random subset
    so that later batches are represented as well as early ones.
    """

    def __init__(self, capacity: int = 1 << 16, seed: int = 0) -> None:
        self.capacity = capacity
        self.values: list[torch.Tensor] = []
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        v = x.detach().abs().flatten().float().cpu()
        self.count += v.numel()
        per_batch = max(1, self.capacity // 8)
        if v.numel() > per_batch:
            v = v[torch.randperm(v.numel(), generator=self.gen)[:per_batch]]
        self.values.append(v)
        total = sum(t.numel() for t in self.values)
        if total > self.capacity:
            allv = torch.cat(self.values)
            self.values = [allv[torch.randperm(allv.numel(), generator=self.gen)
                                [:self.capacity]]]

    def quantiles(self, levels: torch.Tensor) -> torch.Tensor:
        """|x| quantile at each level in [0, 1)."""
        if not self.values:
            raise RuntimeError("no calibration data was seen for this site")
        return torch.quantile(torch.cat(self.values), levels.float())


class RowSample:
    """A bounded, seeded sample of whole rows (tokens) of paired tensors for one site.

    ``gate`` is what the form thresholds, ``value`` what multiplies the weight
    rows (the same tensor for a plain sparse linear). Used to estimate the
    output error each sparsity level causes (greedy allocation).
    """

    def __init__(self, capacity: int = 256, seed: int = 0) -> None:
        self.capacity = capacity
        self.gate: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, gate: torch.Tensor, value: torch.Tensor) -> None:
        # Copies: under Inductor an op's input buffers are reused after the call.
        g = gate.detach().reshape(-1, gate.shape[-1]).to("cpu", torch.float32, copy=True)
        v = value.detach().reshape(-1, value.shape[-1]).to("cpu", torch.float32, copy=True)
        if self.gate is not None:
            g, v = torch.cat([self.gate, g]), torch.cat([self.value, v])
        if g.shape[0] > self.capacity:
            keep = torch.randperm(g.shape[0], generator=self.gen)[:self.capacity]
            g, v = g[keep], v[keep]
        self.gate, self.value = g, v


def interpolate(levels: torch.Tensor, values: torch.Tensor, at: float) -> float:
    """Piecewise-linear interpolation of values(levels) at ``at`` (clamped to the range)."""
    at = min(max(at, float(levels[0])), float(levels[-1]))
    pos = torch.searchsorted(levels, torch.tensor(at, dtype=levels.dtype))
    hi = int(pos.clamp(1, len(levels) - 1))
    lo = hi - 1
    span = float(levels[hi] - levels[lo])
    w = (at - float(levels[lo])) / span if span > 0 else 0.0
    return float(values[lo]) * (1 - w) + float(values[hi]) * w
