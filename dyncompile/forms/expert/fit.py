"""Fitting the expert form from calibration activations: partition, router, compute curve.

- ``balanced_kmeans``: hidden units that co-activate go to the same expert;
  every expert gets its fixed width (capacity-constrained assignment).
- ``Router``: a small MLP that predicts the norm of each expert's
  contribution to the FFN output (regression, as D2DMoE), trained by
  ``train_router``.
- ``compute_curve``: the FFN's spent fraction (router included) against tau
  for dynamic-k selection ``r[t, e] >= tau * max_e r[t, e]``.
"""

from __future__ import annotations

import torch
from torch import nn

TAUS = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


def balanced_kmeans(features: torch.Tensor, widths: list[int], iters: int = 12,
                    seed: int = 0) -> torch.Tensor:
    """Assign each row of ``features`` [H, F] to a cluster, cluster e getting ``widths[e]`` rows.

    Cosine k-means; each assignment step fills clusters greedily from the
    closest (row, cluster) pairs under the capacities. Returns a permutation
    of ``range(H)`` that lists cluster 0's rows first, then cluster 1's, ...
    """
    h = features.shape[0]
    if sum(widths) != h:
        raise ValueError(f"widths sum to {sum(widths)}, expected {h}")
    k = len(widths)
    f = torch.nn.functional.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centers = f[torch.randperm(h, generator=g)[:k]].clone()
    assign = torch.zeros(h, dtype=torch.long)
    for _ in range(iters):
        sim = f @ centers.t()                                   # [H, K]
        order = torch.argsort(sim.flatten(), descending=True)
        rows, cols = order // k, order % k
        left = list(widths)
        chosen = [-1] * h
        placed = 0
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if chosen[r] >= 0 or left[c] == 0:
                continue
            chosen[r] = c
            left[c] -= 1
            placed += 1
            if placed == h:
                break
        new = torch.tensor(chosen, dtype=torch.long)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = f[assign == c]
            if len(members):
                centers[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return torch.argsort(assign, stable=True)


class Router(nn.Module):
    """``x -> relu(W2 relu(W1 x + b1) + b2)``: predicted output norm of each expert."""

    def __init__(self, dim: int, experts: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def flops(self) -> float:
        """FLOPs per token."""
        return 2.0 * (self.fc1.in_features * self.fc1.out_features
                      + self.fc2.in_features * self.fc2.out_features)


def train_router(x: torch.Tensor, target: torch.Tensor, hidden: int = 128, steps: int = 400,
                 batch: int = 256, lr: float = 3e-3, seed: int = 0) -> tuple[Router, float]:
    """Fit a Router on (x [N, D], target [N, E]); returns it and the final relative MSE."""
    torch.manual_seed(seed)
    router = Router(x.shape[1], target.shape[1], hidden)
    scale = target.mean().clamp_min(1e-12)
    with torch.no_grad():
        router.fc2.bias.fill_(1.0)                  # start predicting the mean norm
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    xs, ts = x.float(), target.float() / scale
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, xs.shape[0], (min(batch, xs.shape[0]),), generator=g)
            loss = torch.nn.functional.mse_loss(router(xs[idx]), ts[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        router.fc2.weight.mul_(scale)
        router.fc2.bias.mul_(scale)
        pred = router(xs)
        rel = float((pred - target).square().mean() / target.square().mean().clamp_min(1e-12))
    router.eval().requires_grad_(False)
    return router, rel


def select(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Dynamic-k: expert e runs for token t if ``scores[t, e] >= tau * max_e scores[t, e]``."""
    top = scores.max(dim=-1, keepdim=True).values
    return scores >= tau * top


def compute_curve(scores: torch.Tensor, widths: list[int], router_flops: float,
                  unit_flops: float) -> torch.Tensor:
    """Spent fraction of the FFN's dense FLOPs at each of TAUS (router included).

    ``unit_flops`` is what one (token, hidden unit) pair costs, so the dense
    FFN costs ``unit_flops * H`` per token. Made non-increasing in tau.
    """
    w = torch.tensor(widths, dtype=torch.float64)
    dense = unit_flops * float(w.sum())
    out = []
    for tau in TAUS.tolist():
        sel = select(scores, tau).double()
        units = float((sel * w).sum(1).mean())
        out.append((router_flops + unit_flops * units) / dense)
    return torch.cummin(torch.tensor(out, dtype=torch.float64), 0).values
