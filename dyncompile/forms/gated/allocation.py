"""Budget allocation: how a model-wide budget becomes one sparsity per site.

Each site has a dense cost (FLOPs per token) and a fixed share of that cost
that no sparsity removes (the dense gate projection of a CATS FFN, say). At
keep fraction ``k`` a site costs ``cost * (fixed + (1 - fixed) * k)``.

- ``uniform``: every site keeps the same fraction, chosen so the total cost is
  the budget.
- ``greedy``: starting dense, repeatedly raise by one step the sparsity of the
  site whose estimated output error grows least per FLOP saved; the path of
  allocations is stored once, and a budget picks its point on the path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SiteCost:
    """Dense FLOPs per token of one site and the share of them that never skips."""

    cost: float = 1.0
    fixed: float = 0.0


def uniform_sparsity(costs: dict[str, SiteCost], budget: float,
                     max_sparsity: float = 0.99) -> dict[str, float]:
    """The same sparsity everywhere, so that the summed cost is ``budget`` of dense."""
    total = sum(c.cost for c in costs.values()) or 1.0
    fixed = sum(c.cost * c.fixed for c in costs.values())
    movable = total - fixed
    keep = 1.0 if movable <= 0 else (budget * total - fixed) / movable
    s = min(max(1.0 - keep, 0.0), max_sparsity)
    return dict.fromkeys(costs, s)


class GreedyPath:
    """Allocations from dense to sparsest, cheapest error per saved FLOP first.

    ``errors[site]`` is the estimated relative output error at each of the
    sparsity ``levels`` (non-decreasing after a running max).
    """

    def __init__(self, costs: dict[str, SiteCost], errors: dict[str, torch.Tensor],
                 levels: torch.Tensor) -> None:
        self.levels = [float(v) for v in levels]
        sites = sorted(errors)
        total = sum(costs[s].cost for s in sites) or 1.0
        err = {s: torch.cummax(errors[s].double(), 0).values.tolist() for s in sites}
        step = dict.fromkeys(sites, 0)
        fraction = 1.0 - sum(costs[s].cost * (1 - costs[s].fixed) * self.levels[0]
                             for s in sites) / total
        self.points: list[tuple[float, str | None, int]] = [(fraction, None, 0)]
        n = len(self.levels)
        while True:
            best, best_site = None, None
            for s in sites:
                j = step[s]
                if j + 1 >= n:
                    continue
                saved = costs[s].cost * (1 - costs[s].fixed) * (self.levels[j + 1] -
                                                                self.levels[j])
                ratio = (err[s][j + 1] - err[s][j]) / max(saved, 1e-30)
                if best is None or ratio < best:
                    best, best_site = ratio, s
            if best_site is None:
                break
            j = step[best_site]
            fraction -= costs[best_site].cost * (1 - costs[best_site].fixed) * (
                self.levels[j + 1] - self.levels[j]) / total
            step[best_site] = j + 1
            self.points.append((fraction, best_site, j + 1))
        self.sites = sites

    def sparsity(self, budget: float) -> dict[str, float]:
        """Per-site sparsity for ``budget`` (linear within the last step taken)."""
        alloc = dict.fromkeys(self.sites, self.levels[0])
        prev = self.points[0][0]
        for fraction, site, j in self.points[1:]:
            if fraction >= budget - 1e-12:
                alloc[site] = self.levels[j]
                prev = fraction
                continue
            # Part of this step: move the site between its two levels.
            w = (prev - budget) / (prev - fraction) if prev > fraction else 1.0
            alloc[site] = self.levels[j - 1] + w * (self.levels[j] - self.levels[j - 1])
            break
        return alloc
