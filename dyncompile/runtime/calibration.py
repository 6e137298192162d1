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
