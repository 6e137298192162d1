"""Plain-torch references of the token movements (the definitions the kernels follow).

Tokens are split alternately into a set A (even positions) and a set B (odd
positions), as in bipartite soft matching: each A token's most similar B token
(cosine of the matching features) is its merge candidate, and the ``r`` A tokens
with the most similar candidates merge into them. Tokens whose ``group`` values
differ (padding and real tokens) are never matched. The tokens left keep their
original order, so the first token stays first.
"""

from __future__ import annotations

import torch

NEVER = float("-inf")


def match_reference(metric: torch.Tensor, group: torch.Tensor,
                    protect_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best B partner: (similarity [rows, nA] fp32, B index [rows, nA] int64).

    ``metric`` [rows, tokens, features]; ``group`` [rows, tokens] (tokens of different
    groups never match: similarity -inf). ``protect_first`` keeps token 0 unmatched.
    """
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, 0::2], m[:, 1::2]
    scores = a @ b.transpose(1, 2)
    differ = group[:, 0::2, None] != group[:, None, 1::2]
    scores = scores.masked_fill(differ, NEVER)
    if protect_first and scores.shape[1]:
        scores[:, 0] = NEVER
    if scores.shape[2] == 0:
        rows, na = scores.shape[:2]
        return (torch.full((rows, na), NEVER, device=metric.device),
                torch.zeros((rows, na), dtype=torch.long, device=metric.device))
    best, idx = scores.max(-1)
    return best, idx


def assign_reference(best: torch.Tensor, partner: torch.Tensor, r: int,
                     tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge plan of ``r`` merges per row: (slot [rows, tokens], rep [rows, tokens - r]).

    ``slot[i, t]`` is the output position token ``t`` goes to; ``rep[i, k]`` the input
    position of output ``k``'s kept token (the B token a group merged into). The ``r``
    A tokens with the highest ``best`` merge (ties: the earlier token); the caller keeps
    ``r`` at most the count of A tokens with a finite ``best`` in every row.
    """
    rows, na = best.shape
    if not 0 <= r <= na:
        raise ValueError(f"r={r} merges, but there are {na} candidate tokens per row")
    dev = best.device
    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    src = order[:, :r]                           # A indices that merge
    dst = partner.gather(1, src) * 2 + 1         # their B positions
    kept = torch.ones(rows, tokens, dtype=torch.bool, device=dev)
    kept.scatter_(1, src * 2, False)
    slot = kept.long().cumsum(1) - 1
    slot.scatter_(1, src * 2, slot.gather(1, dst))
    rep = kept.nonzero()[:, 1].clone().view(rows, tokens - r)  # a fresh tensor, not a view
    return slot, rep


def merge_reference(x: torch.Tensor, size: torch.Tensor, slot: torch.Tensor,
                    n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens sharing a slot: (y [rows, n_out, width] in x's
    dtype, sizes [rows, n_out] fp32). ``size`` [rows, tokens] holds each token's weight
    (how many input tokens it stands for)."""
    rows, tokens, width = x.shape
    w = size.float()
    acc = torch.zeros(rows, n_out, width, dtype=torch.float32, device=x.device)
    acc.scatter_add_(1, slot[..., None].expand(rows, tokens, width), x.float() * w[..., None])
    total = torch.zeros(rows, n_out, dtype=torch.float32, device=x.device)
    total.scatter_add_(1, slot, w)
    return (acc / total.clamp_min(1e-30)[..., None]).to(x.dtype), total


def unmerge_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``y[i, t] = x[i, index[i, t]]``: each original token takes its group's row."""
    rows, tokens = index.shape
    return x.gather(1, index[..., None].expand(rows, tokens, x.shape[2]))
