"""Distribution-free bounds on a mean loss in [0, 1] (Learn-then-Test).

``p_value(mean, n, t)`` tests H0: "the true mean loss exceeds ``t``" from ``n``
i.i.d. losses with empirical mean ``mean``, with the Hoeffding-Bentkus bound
(Bates et al., "Distribution-free, risk-controlling prediction sets"; used by
CALM): the smaller of Hoeffding's ``exp(-n h(mean, t))`` and Bentkus'
``e * P(Binomial(n, t) <= ceil(n * mean))``. Testing the points of a fixed
sequence in order and stopping at the first that fails controls the error
at ``delta`` without any correction for the number of points.
"""

from __future__ import annotations

import math


def _kl(a: float, b: float) -> float:
    """Bernoulli KL divergence kl(a || b) (Hoeffding's tighter exponent)."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (n up to a few hundred thousand)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp
             + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def p_value(mean: float, n: int, t: float) -> float:
    """Hoeffding-Bentkus p-value of H0: true mean loss > ``t`` (losses in [0, 1])."""
    if n <= 0:
        return 1.0
    mean = min(max(mean, 0.0), 1.0)
    if mean >= t:
        return 1.0
    hoeffding = math.exp(-n * _kl(mean, t))
    bentkus = math.e * _binom_cdf(math.ceil(n * mean), n, t)
    return min(1.0, hoeffding, bentkus)


def upper_bound(mean: float, n: int, delta: float) -> float:
    """The smallest ``t`` with ``p_value(mean, n, t) <= delta``: a (1 - delta) upper
    confidence bound on the true mean loss (1.0 when ``n`` rows cannot bound it)."""
    if p_value(mean, n, 1.0 - 1e-9) > delta:
        return 1.0
    lo, hi = min(max(mean, 0.0), 1.0), 1.0 - 1e-9
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(mean, n, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def rows_needed(t: float, delta: float) -> int:
    """Rows needed to certify a loss of 0 within ``t`` at confidence ``1 - delta``."""
    n = 1
    while p_value(0.0, n, t) > delta:
        n = n * 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if p_value(0.0, mid, t) <= delta:
            hi = mid
        else:
            lo = mid
    return hi
