"""The budget as a merge schedule: one keep ratio for every merge point.

After each merge point the token count is multiplied by the same ratio ``rho``
(at least 1/2: bipartite matching merges at most half the tokens at once). The
pieces' costs are affine in their token count ``n`` (linears) plus quadratic
(attention scores and mixing), so the whole call's cost is known for any
``rho``; bisection finds the ratio whose cost is the budget's share of the dense
cost. A budget below what ``rho = 1/2`` reaches takes ``rho = 1/2``.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_RATIO = 0.5
MIN_TOKENS = 2  # pieces are compiled for symbolic sizes of 2 and more


def token_counts(tokens: int, ratio: float, merge_after: Sequence[bool]) -> list[int]:
    """Tokens entering each piece when each merge point keeps ``ratio`` of them."""
    counts, n = [], tokens
    for merges in merge_after:
        counts.append(n)
        if merges:
            # at most every A token but the protected first one merges: n // 2 + 1 stay
            n = max(round(n * ratio), n // 2 + 1, min(n, MIN_TOKENS))
    return counts


def spent(tokens: int, counts: Sequence[int], linear: Sequence[float],
          quadratic: Sequence[float], head: float) -> float:
    """FLOPs of one row: each piece at its token count, the head at the full count."""
    return (sum(c * n + q * n * n for c, q, n in zip(linear, quadratic, counts))
            + head * tokens)


def keep_ratio(budget: float, tokens: int, merge_after: Sequence[bool],
               linear: Sequence[float], quadratic: Sequence[float], head: float) -> float:
    """The keep ratio whose cost is ``budget`` times the dense cost (1.0 for a budget of
    1.0 or more; ``MIN_RATIO`` when even that costs more than the budget)."""
    if budget >= 1.0 or not any(merge_after) or tokens <= MIN_TOKENS:
        return 1.0
    dense = spent(tokens, [tokens] * len(merge_after), linear, quadratic, head)
    target = budget * dense

    def cost(r: float) -> float:
        return spent(tokens, token_counts(tokens, r, merge_after), linear, quadratic, head)

    if cost(MIN_RATIO) >= target:
        return MIN_RATIO
    lo, hi = MIN_RATIO, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if cost(mid) > target:
            hi = mid
        else:
            lo = mid
    return lo
