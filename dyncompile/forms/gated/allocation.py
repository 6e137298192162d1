"""Budget allocation: how a model-wide budget becomes one sparsity per site.

Each site has a dense cost (FLOPs per token) and a fixed share of that cost
that no sparsity removes (the dense gate projection of a CATS FFN, say). At
keep fraction ``k`` a site costs ``cost * (fixed + (1 - fixed) * k)``.

- ``uniform``: every site keeps the same fraction, chosen so the total cost is
  the budget.
- ``greedy``: starting dense, repeatedly raise by one step the sparsity of the
  site whose estimated output error grows least per FLOP saved; the path of
  allocations is stored once, and a budget picks its point on the path.
- ``block`` (TEAL's allocation): the same greedy steps, but within each block,
  on the error of the block's real output, measured by running the block on
  recorded inputs for every candidate step (:func:`block_path`); every block
  spends the budget, split among its sites by its own path.
"""

from __future__ import annotations

from collections.abc import Callable
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


class StepPath:
    """Allocations from dense to sparsest, one site raised by one level per step.

    ``points[i] = (fraction, site, level index)``: after step ``i`` the sites spend
    ``fraction`` of their dense cost and ``site`` sits at ``levels[level index]``
    (``points[0]`` is the start, with no site).
    """

    def __init__(self, sites: list[str], levels: list[float],
                 points: list[tuple[float, str | None, int]]) -> None:
        self.sites, self.levels, self.points = sites, levels, points

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

    def to_tensor(self) -> torch.Tensor:
        """The points as rows (fraction, site index, level index), for saving."""
        index = {s: i for i, s in enumerate(self.sites)}
        return torch.tensor([[f, -1 if s is None else index[s], j] for f, s, j in self.points],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, sites: list[str], levels: list[float], t: torch.Tensor) -> StepPath:
        points = [(float(f), None if int(s) < 0 else sites[int(s)], int(j))
                  for f, s, j in t.tolist()]
        return cls(sites, levels, points)


def _moved(costs: dict[str, SiteCost], site: str, levels: list[float], j: int) -> float:
    """Dense FLOPs per token that raising ``site`` from level ``j`` to ``j + 1`` saves."""
    return costs[site].cost * (1 - costs[site].fixed) * (levels[j + 1] - levels[j])


def _start(costs: dict[str, SiteCost], sites: list[str], levels: list[float]
           ) -> tuple[float, float]:
    total = sum(costs[s].cost for s in sites) or 1.0
    fraction = 1.0 - sum(costs[s].cost * (1 - costs[s].fixed) * levels[0] for s in sites) / total
    return total, fraction


class GreedyPath(StepPath):
    """Greedy steps on separable per-site error estimates.

    ``errors[site]`` is the estimated relative output error at each of the
    sparsity ``levels`` (non-decreasing after a running max).
    """

    def __init__(self, costs: dict[str, SiteCost], errors: dict[str, torch.Tensor],
                 levels: torch.Tensor) -> None:
        lv = [float(v) for v in levels]
        sites = sorted(errors)
        total, fraction = _start(costs, sites, lv)
        err = {s: torch.cummax(errors[s].double(), 0).values.tolist() for s in sites}
        step = dict.fromkeys(sites, 0)
        points: list[tuple[float, str | None, int]] = [(fraction, None, 0)]
        n = len(lv)
        while True:
            best, best_site = None, None
            for s in sites:
                j = step[s]
                if j + 1 >= n:
                    continue
                ratio = (err[s][j + 1] - err[s][j]) / max(_moved(costs, s, lv, j), 1e-30)
                if best is None or ratio < best:
                    best, best_site = ratio, s
            if best_site is None:
                break
            j = step[best_site]
            fraction -= _moved(costs, best_site, lv, j) / total
            step[best_site] = j + 1
            points.append((fraction, best_site, j + 1))
        super().__init__(sites, lv, points)


def block_path(costs: dict[str, SiteCost], sites: list[str], levels: torch.Tensor,
               error: Callable[[dict[str, float]], float], floor: float = 0.0,
               progress: Callable[[], None] | None = None) -> StepPath:
    """TEAL's greedy allocation within one block.

    Starting dense, each step tries raising every site of the block by one level,
    measures ``error(sparsity per site)`` (the block's output error with those
    sparsities), and keeps the step that adds the least error per FLOP saved. Stops
    when every site is at the last level or the block spends at most ``floor`` of
    its dense cost.
    """
    lv = [float(v) for v in levels]
    sites = sorted(sites)
    total, fraction = _start(costs, sites, lv)
    step = dict.fromkeys(sites, 0)
    current = 0.0
    points: list[tuple[float, str | None, int]] = [(fraction, None, 0)]
    while fraction > floor + 1e-12:
        best, best_site, best_err = None, None, 0.0
        for s in sites:
            j = step[s]
            if j + 1 >= len(lv):
                continue
            trial = {t: lv[step[t] + (t == s)] for t in sites}
            e = error(trial)
            if progress is not None:
                progress()
            ratio = (e - current) / max(_moved(costs, s, lv, j), 1e-30)
            if best is None or ratio < best:
                best, best_site, best_err = ratio, s, e
        if best_site is None:
            break
        j = step[best_site]
        fraction -= _moved(costs, best_site, lv, j) / total
        step[best_site] = j + 1
        current = best_err
        points.append((fraction, best_site, j + 1))
    return StepPath(sites, lv, points)
