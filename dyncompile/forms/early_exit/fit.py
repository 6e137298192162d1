"""Fitting for the early-exit form: calibrated exit quality and the budget's threshold.

At each exit point a raw signal (max softmax of the shared head, or the cosine
between consecutive pooled states) is mapped to the quality it predicts (how
often the exit agrees with the full model, or the cosine of its output to the
full output) by a monotone binned fit. One threshold on that calibrated
quality then means the same thing at every depth; the budget picks it from the
mean cost the rows of the calibration data would spend under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MAX_CANDIDATES = 512  # thresholds tried when fitting the budget curve


def isotonic(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Non-decreasing least-squares fit of ``values`` (pool adjacent violators)."""
    v = [float(x) for x in values]
    w = [float(x) for x in weights]
    blocks: list[list[float]] = []  # [mean, weight, count]
    for x, wt in zip(v, w):
        blocks.append([x, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            tot = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / tot if tot else m1, tot, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out += [m] * int(c)
    return torch.tensor(out, dtype=torch.float32)


@dataclass
class QualityMap:
    """Signal -> predicted quality at one exit: the isotonic bin means, interpolated
    linearly between the bins' mean signals (``centers``) and constant beyond them."""

    centers: torch.Tensor  # [bins], increasing
    values: torch.Tensor   # [bins], non-decreasing

    @classmethod
    def fit(cls, signal: torch.Tensor, target: torch.Tensor, bins: int = 24) -> QualityMap:
        signal, target = signal.float().flatten().contiguous(), target.float().flatten()
        if signal.numel() == 0:
            raise ValueError("no calibration samples for an exit")
        qs = torch.linspace(0, 1, bins + 1)[1:-1]
        edges = torch.unique(torch.quantile(signal, qs))
        idx = torch.bucketize(signal, edges)
        n = edges.numel() + 1
        count = torch.bincount(idx, minlength=n).float()
        total = torch.bincount(idx, weights=target, minlength=n)
        where = torch.bincount(idx, weights=signal, minlength=n)
        full = count > 0
        # One pseudo-observation at the overall mean: a small bin that agreed every time
        # ranks below a large one that did (no saturated ties at 1.0).
        prior = float(target.mean())
        mean = (total[full] + prior) / (count[full] + 1.0)
        centers = where[full] / count[full]
        return cls(centers.contiguous(), isotonic(mean, count[full]))

    def __call__(self, signal: torch.Tensor) -> torch.Tensor:
        s = signal.float().contiguous()
        c, v = self.centers, self.values
        if c.numel() == 1:
            return v.expand_as(s).clone()
        i = torch.bucketize(s, c).clamp(1, c.numel() - 1)
        c0, c1, v0, v1 = c[i - 1], c[i], v[i - 1], v[i]
        t = ((s - c0) / (c1 - c0).clamp_min(1e-12)).clamp(0.0, 1.0)
        return v0 + t * (v1 - v0)


    def cut(self, threshold: float) -> float:
        """The least signal whose predicted quality reaches ``threshold`` (``-inf``: every
        signal does, ``inf``: none): ``self(s) >= threshold`` iff ``s >= cut``, since the
        map is non-decreasing and continuous."""
        c, v = self.centers.double().tolist(), self.values.double().tolist()
        if v[0] >= threshold:
            return float("-inf")
        if v[-1] < threshold:
            return float("inf")
        i = next(j for j, x in enumerate(v) if x >= threshold)
        return c[i - 1] + (threshold - v[i - 1]) / (v[i] - v[i - 1]) * (c[i] - c[i - 1])


def exit_layers(quality: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row, the first exit (1-based) whose quality reaches ``threshold``; K + 1 if none.

    ``quality`` is [N, K] (K exits, in depth order).
    """
    n, k = quality.shape
    hit = quality >= threshold
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full((n,), k + 1))
    return first


@dataclass
class ThresholdCurve:
    """Mean cost fraction of the calibration rows against the exit threshold."""

    thresholds: torch.Tensor  # increasing
    fractions: torch.Tensor   # non-decreasing in threshold

    @classmethod
    def fit(cls, quality: torch.Tensor, exit_cost: Any) -> ThresholdCurve:
        """``exit_cost`` (a tensor, or a function of the threshold giving one): entry k - 1
        = cost fraction of a row leaving at exit k (k = 1..K+1, the last entry = running
        the whole model with its exit checks)."""
        cands = torch.unique(quality.flatten())
        if cands.numel() > MAX_CANDIDATES:
            cands = torch.unique(torch.quantile(cands, torch.linspace(0, 1, MAX_CANDIDATES)))
        cands = torch.cat([cands, torch.tensor([float("inf")])])
        cost = exit_cost if callable(exit_cost) else (lambda t: exit_cost)
        fr = torch.stack([cost(float(t))[exit_layers(quality, float(t)) - 1].mean()
                          for t in cands])
        fr = torch.cummax(fr, 0).values
        return cls(cands, fr)

    def threshold(self, budget: float) -> float:
        """The threshold whose calibrated cost is closest to ``budget`` (the cheaper one on
        a tie); the lowest threshold when even exiting as early as possible costs more."""
        gap = (self.fractions - budget).abs()
        best = gap.min()
        i = int((gap <= best + 1e-9).nonzero()[0])
        return float(self.thresholds[i])

    def fraction(self, budget: float) -> float:
        """The calibrated cost fraction at the threshold ``budget`` picks."""
        t = self.threshold(budget)
        i = int((self.thresholds == t).nonzero()[0])
        return float(self.fractions[i])
