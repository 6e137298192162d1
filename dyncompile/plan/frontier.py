"""The plan: from one budget (or one quality tolerance) to the knob of every form.

Each form has one knob in (0, 1] (1.0: dense): ``gated`` the share of its linears'
work it keeps, ``expert`` the share of its FFN work, ``early_exit`` the share of the
layer stack's work. :func:`search` measures, on calibration rows, each form alone
over its knob's range (quality loss, FLOPs spent, wall-clock time), predicts every
joint setting by adding the forms' savings and losses, and keeps, for each target
spend (0.95, 0.90, ... 0.10), the setting predicted to lose the least within it,
and each form's best setting alone within it. Those points (the path, most
expensive first) are then measured jointly on held-out rows (forms interact),
which gives the :class:`Plan`:

- a budget picks the least lossy measured point within it, or, of the points
  within one standard error of that loss, the one that spends the most;
- a tolerance picks the cheapest point of the path whose loss is certified within
  it, testing the path's points in order (fixed-sequence Learn-then-Test, with the
  Hoeffding-Bentkus bound of :mod:`dyncompile.plan.bound`).

Size classes: what a form saves depends on the call's size (the ``gated`` kernels
skip weight rows only for calls of a few tokens, as in decoding). A plan measured on
calibration batches larger than :data:`SMALL_CALL_TOKENS` tokens carries a second
plan, ``small``, measured on decode-sized pieces of the same batches; a call of at
most that many tokens resolves its budget there.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import bound

#: Knob values each form is measured at while planning (1.0 first).
GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
#: Spent fractions the plan places a jointly measured point at (or just below).
TARGETS = tuple(round(1.0 - 0.05 * i, 2) for i in range(1, 19))  # 0.95 ... 0.10
UNITS = ("flops", "time")
#: Calls of at most this many tokens form the small size class (the decode regime: the
#: sparse kernels' row walk, ``SPARSE_MAX_TOKENS``).
SMALL_CALL_TOKENS = 16
DEFAULT_CONFIDENCE = 0.9


@dataclass
class Measurement:
    """One knob setting run on some rows: spent fractions and each row's loss."""

    flops: float
    time: float
    losses: list[float]

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else 0.0

    @property
    def se(self) -> float:
        """Standard error of :attr:`loss` (the rows' spread / sqrt(rows))."""
        n = len(self.losses)
        if n < 2:
            return 0.0
        mean = self.loss
        return (sum((x - mean) ** 2 for x in self.losses) / (n - 1) / n) ** 0.5


@dataclass
class Point:
    """One joint setting of the forms' knobs, measured on the held-out rows."""

    knobs: dict[str, float]
    flops: float
    time: float
    loss: float
    rows: int
    step: int = 0
    se: float = 0.0  # standard error of loss

    def cost(self, unit: str) -> float:
        return self.flops if unit == "flops" else self.time


@dataclass
class Certificate:
    """What ``tolerance=t`` chose: the point, its held-out loss and the bound on it."""

    tolerance: float
    confidence: float
    point: Point
    bound: float
    rows: int

    def __str__(self) -> str:
        return (f"tolerance {self.tolerance:g}: loss {self.point.loss:.4f} on {self.rows} "
                f"held-out rows, <= {self.bound:.4f} with confidence {self.confidence:g}; "
                f"spends {self.point.flops:.3f} of dense FLOPs, {self.point.time:.3f} of "
                f"dense time")


@dataclass
class Plan:
    """The measured path of knob settings, and the lookups budgets and tolerances use."""

    forms: list[str]
    points: list[Point]
    unit: str = "flops"
    held_out: bool = True
    confidence: float = DEFAULT_CONFIDENCE
    single: dict[str, list[Point]] = field(default_factory=dict)
    #: The plan for calls of at most ``SMALL_CALL_TOKENS`` tokens (None: this one).
    small: Plan | None = None
    _cache: dict[tuple[str, float], tuple[float, dict[str, float]]] = field(
        default_factory=dict, repr=False)

    # ---------------------------------------------------------------- lookups
    def frontier(self, unit: str | None = None) -> list[Point]:
        """Pareto-optimal points (none other is cheaper and better), cheapest first; the
        dense point always ends it."""
        unit = unit or self.unit
        dense = self.dense
        out: list[Point] = []
        for p in sorted(self.points[1:], key=lambda p: (p.cost(unit), p.loss)):
            if p.cost(unit) < 1.0 and (not out or p.loss < out[-1].loss - 1e-12):
                out.append(p)
        return [*out, dense]

    @property
    def dense(self) -> Point:
        return self.points[0]

    def point_for_budget(self, value: float) -> Point:
        """The measured point a budget ``value`` (a fraction of dense in ``unit``) runs:
        among the points within it, the least lossy, or, among those whose loss is
        within one standard error of it, the one that spends the most (on a few
        held-out rows a cheaper point can measure better by chance: the budget the
        user gave is not given away on noise). The cheapest point when none is within.
        Knob values between measured points are not used: a form's cost need not fall
        monotonically between grid values (a router costs before it saves)."""
        unit = self.unit
        within = [p for p in self.points if p.cost(unit) <= value + 1e-9]
        if not within:
            cheapest = self.frontier()[0]
            where = (f" for calls of more than {SMALL_CALL_TOKENS} tokens"
                     if self.small is not None else "")
            warnings.warn(
                f"dyncompile: budget {value:g} is below every planned point{where}: the cheapest "
                f"spends {cheapest.cost(unit):.3f} of dense "
                f"{'FLOPs' if unit == 'flops' else 'time'} (loss {cheapest.loss:.3g}) and "
                f"runs instead (the forms' knobs reach no lower on this model)",
                UserWarning, stacklevel=2)
            return cheapest
        best = min(within, key=lambda p: (p.loss, -p.cost(unit)))
        near = [p for p in within if p.loss <= best.loss + best.se + 1e-12]
        return max(near, key=lambda p: (p.cost(unit), -p.loss))

    def knobs_for_budget(self, value: float) -> dict[str, float]:
        """Every form's knob for budget ``value``: see :meth:`point_for_budget`."""
        return dict(self.point_for_budget(value).knobs)

    def certify(self, tolerance: float, confidence: float | None = None) -> Certificate:
        """The cheapest point of the path certified within ``tolerance`` (mean loss on
        held-out rows) at ``confidence``; ValueError when the rows cannot certify it."""
        confidence = self.confidence if confidence is None else confidence
        delta = 1.0 - confidence
        rows = self.dense.rows
        if not self.held_out:
            raise ValueError("dyncompile: a tolerance needs held-out calibration rows: give "
                             "at least 2 calibration batches (a share of them is held out "
                             "to certify the quality)")
        need = bound.rows_needed(tolerance, delta)
        if rows < need:
            raise ValueError(
                f"dyncompile: cannot certify tolerance {tolerance:g} at confidence "
                f"{confidence:g} on {rows} held-out rows: it needs at least {need} (give "
                f"more calibration rows, or ask for a larger tolerance)")
        chosen = self.dense
        for p in sorted(self.points[1:], key=lambda p: p.step):
            if bound.p_value(p.loss, p.rows, tolerance) > delta:
                break
            chosen = p
        return Certificate(tolerance, confidence, chosen,
                           bound.upper_bound(chosen.loss, chosen.rows, delta), rows)

    def for_tokens(self, tokens: int | None) -> Plan:
        """The plan of a call's size class: ``small`` for calls of at most
        ``SMALL_CALL_TOKENS`` tokens when there is one, else this plan."""
        if self.small is not None and tokens is not None and tokens <= SMALL_CALL_TOKENS:
            return self.small
        return self

    def resolve(self, kind: str, value: float,
                tokens: int | None = None) -> tuple[float, dict[str, float]]:
        """(the value in force, every form's knob) for ``("budget", b)`` or
        ``("tolerance", t)`` for a call of ``tokens`` tokens (None: unknown, the main
        plan); cached, so a call pays one dictionary lookup."""
        plan = self.for_tokens(tokens)
        if plan is not self:
            return plan.resolve(kind, value)
        key = (kind, value)
        got = self._cache.get(key)
        if got is None:
            if kind == "tolerance":
                p = self.certify(value).point
                got = (p.cost(self.unit), dict(p.knobs))
            else:
                got = (value, self.knobs_for_budget(value))
            self._cache[key] = got
        return got

    # ---------------------------------------------------------------- showing
    def run_points(self) -> list[Point]:
        """The points budgets from 1.0 down to the cheapest point run (see
        :meth:`point_for_budget`), most expensive first."""
        cheapest = self.frontier()[0].cost(self.unit)
        out: list[Point] = []
        for b in (1.0, *TARGETS, *(p.cost(self.unit) for p in self.points)):
            if b >= cheapest - 1e-9:
                p = self.point_for_budget(b)
                if all(p is not q for q in out):
                    out.append(p)
        return sorted(out, key=lambda p: -p.cost(self.unit))

    def table(self) -> str:
        """The points budgets run, as a table: the budget from which each runs (its
        spend), each form's knob, loss, FLOPs, time."""
        head = ["budget", *self.forms, "loss", "flops", "time"]
        rows = []
        for p in self.run_points():
            rows.append([f"{p.cost(self.unit):.3f}", *(f"{p.knobs.get(f, 1.0):.2f}"
                                                       for f in self.forms),
                         f"{p.loss:.3g}", f"{p.flops:.3f}", f"{p.time:.3f}"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        what = "FLOPs" if self.unit == "flops" else "time on this device"
        lines.append(f"budget: fraction of dense {what}; "
                     f"loss: mean over {self.dense.rows} "
                     f"{'held-out ' if self.held_out else ''}rows (1 - cosine, or top-1 "
                     f"disagreement for logits); {len(self.points)} points measured; a "
                     f"budget runs the row at or below it")
        if self.small is not None:
            lines += ["", f"calls of at most {SMALL_CALL_TOKENS} tokens (decode-sized):",
                      self.small.table()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Save the frontier and each form alone as loss against spent fraction."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, unit in zip(axes, UNITS):
            for form, pts in self.single.items():
                pts = sorted(pts, key=lambda p: p.cost(unit))
                ax.plot([p.cost(unit) for p in pts], [p.loss for p in pts], "o--",
                        alpha=0.6, label=f"{form} alone (fitting rows)")
            front = self.frontier(unit)
            ax.plot([p.cost(unit) for p in front], [p.loss for p in front], "k-o",
                    label="planned, all forms (held-out rows)")
            ax.set_xlabel(f"spent fraction of dense {'FLOPs' if unit == 'flops' else 'time'}")
            ax.set_ylabel("quality loss (1 - cosine, or top-1 disagreement)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    # ---------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        return {"forms": self.forms, "unit": self.unit, "held_out": self.held_out,
                "confidence": self.confidence,
                "points": [asdict(p) for p in self.points],
                "single": {f: [asdict(p) for p in ps] for f, ps in self.single.items()},
                "small": self.small.to_dict() if self.small is not None else None}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Plan:
        return cls(forms=list(doc["forms"]), points=[Point(**p) for p in doc["points"]],
                   unit=doc.get("unit", "flops"), held_out=bool(doc.get("held_out", True)),
                   confidence=float(doc.get("confidence", DEFAULT_CONFIDENCE)),
                   single={f: [Point(**p) for p in ps]
                           for f, ps in doc.get("single", {}).items()},
                   small=cls.from_dict(doc["small"]) if doc.get("small") else None)


def search(forms: Sequence[str], measure_fit: Callable[[dict[str, float]], Measurement],
           measure_test: Callable[[dict[str, float]], Measurement], *, unit: str = "flops",
           held_out: bool = True, grid: Sequence[float] = GRID,
           targets: Sequence[float] = TARGETS,
           progress: Callable[[int], Any] | None = None) -> Plan:
    """Measure each form alone over ``grid`` (on the fitting rows), pick the joint setting
    predicted best at each of ``targets`` and measure those jointly (on the held-out
    rows); returns the :class:`Plan`."""
    if unit not in UNITS:
        raise ValueError(f"budget_unit must be one of {UNITS}, got {unit!r}")
    forms = list(forms)
    tick = progress or (lambda n: None)
    curves: dict[str, list[Measurement]] = {}
    base = measure_fit({})
    tick(1)
    for f in forms:
        curves[f] = [base] + [measure_fit({f: k}) for k in grid[1:]]
        tick(len(grid) - 1)
    chosen = choose(curves, grid, unit, targets)
    points = []
    for step, idx in enumerate(chosen):
        knobs = {f: float(grid[j]) for f, j in zip(forms, idx)}
        m = measure_test(knobs)
        points.append(Point(knobs, m.flops, m.time, m.loss, len(m.losses), step, m.se))
        tick(1)
    points[0] = Point(points[0].knobs, 1.0, 1.0, 0.0, points[0].rows, 0)
    single = {f: [Point({f: float(k)}, m.flops, m.time, m.loss, len(m.losses), i, m.se)
                  for i, (k, m) in enumerate(zip(grid, curves[f]))] for f in forms}
    return Plan(forms, points, unit=unit, held_out=held_out, single=single)


def choose(curves: dict[str, list[Measurement]], grid: Sequence[float], unit: str,
           targets: Sequence[float]) -> list[tuple[int, ...]]:
    """Grid indices (one per form, in ``curves``' order) of the joint settings to measure:
    dense first, then for each target the setting predicted to lose the least while
    spending at most the target, and each form's best setting alone within it, most
    expensive first (the order is fixed by the fitting rows, as fixed-sequence testing
    needs). The prediction adds up each form's measured saving and loss (every
    combination is scored: a form whose first steps cost more than they save, as a
    router does, is still reached through its later ones); ties go to the setting that
    changes the knobs least. Forms interact, so the joint measurement on held-out rows
    decides between a mix and a form alone."""
    forms = list(curves)

    def cost(m: Measurement) -> float:
        return m.flops if unit == "flops" else m.time

    saved = [[cost(curves[f][0]) - cost(m) for m in curves[f]] for f in forms]
    lost = [[max(m.loss - curves[f][0].loss, 0.0) for m in curves[f]] for f in forms]
    scored = []
    for idx in itertools.product(range(len(grid)), repeat=len(forms)):
        spend = 1.0 - sum(saved[i][j] for i, j in enumerate(idx))
        loss = sum(lost[i][j] for i, j in enumerate(idx))
        scored.append((loss, sum(idx), spend, idx))
    dense = (0,) * len(forms)
    picked: dict[tuple[int, ...], float] = {}
    for t in sorted(targets, reverse=True):
        within = [s for s in scored if s[2] <= t + 1e-12]
        if within:
            loss, _, spend, idx = min(within, key=lambda s: (s[0], s[1]))
            picked.setdefault(idx, spend)
        for i in range(len(forms)):  # each form alone too: the sum can miss interactions
            alone = [s for s in within if all(j == 0 for k, j in enumerate(s[3]) if k != i)]
            if alone:
                loss, _, spend, idx = min(alone, key=lambda s: (s[0], s[1]))
                picked.setdefault(idx, spend)
    picked.pop(dense, None)
    return [dense, *sorted(picked, key=lambda idx: (-picked[idx], idx))]


def path_length(forms: int, grid: Sequence[float] = GRID,
                targets: Sequence[float] = TARGETS) -> int:
    """Upper bound of the measurements :func:`search` makes (for progress bars)."""
    return 1 + forms * (len(grid) - 1) + 1 + len(targets) + forms * (len(grid) - 1)
