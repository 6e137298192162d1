"""What each call really spent, from the cost model and the forms' ops."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class CallStats:
    """FLOPs of one call: dense (the model as traced) and spent (after forms skipped work)."""

    dense_flops: float = 0.0
    spent_flops: float = 0.0
    budget: float = 1.0
    graphs: int = 0
    counters: dict[str, list[float]] = field(default_factory=dict)
    last_graph_flops: float = field(default=0.0, repr=False)
    #: Spent FLOPs had each token row run as a call of its own (the decode regime):
    #: ``spent_flops`` but for ops whose skipping depends on the rows run together
    #: (``gated``'s kernels skip a weight row only when no row of the call needs it).
    token_spent_flops: float = 0.0

    @property
    def fraction(self) -> float:
        """Spent / dense FLOPs (1.0 when nothing was skipped)."""
        return self.spent_flops / self.dense_flops if self.dense_flops else 1.0

    @property
    def token_fraction(self) -> float:
        """``token_spent_flops`` / dense FLOPs."""
        return self.token_spent_flops / self.dense_flops if self.dense_flops else 1.0

    def ratio(self, name: str) -> float | None:
        """A ratio the forms' ops reported (e.g. "active_channels"), or None."""
        num_den = self.counters.get(name)
        return num_den[0] / num_den[1] if num_den and num_den[1] else None

    def __repr__(self) -> str:
        return (f"CallStats(budget={self.budget:.3f}, spent={self.fraction:.3f} of "
                f"{self.dense_flops:.3e} dense FLOPs, graphs={self.graphs})")


_CURRENT: contextvars.ContextVar[CallStats | None] = contextvars.ContextVar(
    "dyncompile_call_stats", default=None)
_LAST = CallStats()
_lock = threading.Lock()
_compiles = 0


def begin_call(budget: float) -> contextvars.Token:
    """Start collecting stats for one user-level call."""
    return _CURRENT.set(CallStats(budget=budget))


def end_call(token: contextvars.Token) -> CallStats:
    global _LAST
    stats = _CURRENT.get() or CallStats()
    _CURRENT.reset(token)
    _LAST = stats
    return stats


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Run ops without recording into any user call's stats (measuring a setting)."""
    token = _CURRENT.set(CallStats())
    try:
        yield
    finally:
        _CURRENT.reset(token)


def record_graph(dense: float, budget: float) -> None:
    """A compiled graph ran: add its dense FLOPs (spent starts equal to dense)."""
    global _LAST
    stats = _CURRENT.get()
    if stats is None:  # a plain torch.compile call: each graph is its own call
        _LAST = CallStats(dense, dense, budget, 1, last_graph_flops=dense,
                          token_spent_flops=dense)
        return
    stats.dense_flops += dense
    stats.spent_flops += dense
    stats.token_spent_flops += dense
    stats.budget = budget
    stats.graphs += 1
    stats.last_graph_flops = dense


def record_saving(flops: float) -> None:
    """Called by a form's op: this call skipped ``flops`` of the dense work."""
    stats = _CURRENT.get()
    target = stats if stats is not None else _LAST
    target.spent_flops -= flops
    target.token_spent_flops -= flops


def record_saving_fraction(fraction: float) -> None:
    """Called by a form's runtime: the graph now running skipped ``fraction`` of its dense
    FLOPs (negative when it spent more)."""
    stats = _CURRENT.get()
    target = stats if stats is not None else _LAST
    target.spent_flops -= fraction * target.last_graph_flops
    target.token_spent_flops -= fraction * target.last_graph_flops


def record_op(saving: float, *ratios: tuple[str, float, float],
              token_saving: float | None = None) -> None:
    """``record_saving(saving)`` and ``record_ratio(*r)`` for each of ``ratios``, in one
    call (an op's kernel calls it once per call). ``token_saving``: what the call would
    have skipped with each token row run alone, where that differs from ``saving``."""
    stats = _CURRENT.get()
    target = stats if stats is not None else _LAST
    target.spent_flops -= saving
    target.token_spent_flops -= saving if token_saving is None else token_saving
    for name, num, den in ratios:
        pair = target.counters.setdefault(name, [0.0, 0.0])
        pair[0] += num
        pair[1] += den


def record_spent(name: str, flops: float) -> None:
    """Called by a form's op: this call spent ``flops`` beyond the dense work (a router),
    also counted as spent in the ratio ``name`` (``record_saving(-flops)`` and
    ``record_ratio(name, flops, 0)`` in one)."""
    stats = _CURRENT.get()
    target = stats if stats is not None else _LAST
    target.spent_flops += flops
    target.token_spent_flops += flops
    pair = target.counters.setdefault(name, [0.0, 0.0])
    pair[0] += flops


def record_ratio(name: str, num: float, den: float) -> None:
    """Called by a form's op: accumulate a ratio for this call (``CallStats.ratio(name)``)."""
    stats = _CURRENT.get()
    target = stats if stats is not None else _LAST
    pair = target.counters.setdefault(name, [0.0, 0.0])
    pair[0] += num
    pair[1] += den


def last_call() -> CallStats:
    """Stats of the most recent call of any optimized model in this process."""
    return _LAST


def count_compile() -> None:
    global _compiles
    with _lock:
        _compiles += 1


def compile_count() -> int:
    """How many graphs the ``dyn`` backend has compiled in this process."""
    return _compiles
