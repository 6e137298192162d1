"""The compute budget as runtime state, read by the forms' ops at call time.

Each optimized model has one :class:`BudgetState`; its id is a constant of the
compiled graphs and each form's *knob* (its own setting in (0, 1]) is read inside
the forms' opaque ops, so no budget is ever baked into a graph and nothing
recompiles when it changes. A plan (``dyncompile.plan``) turns the model-wide
budget, or a quality tolerance, into the knobs of every form; without a plan each
form's knob is the budget itself. ``with budget(0.3):`` / ``with tolerance(0.02):``
set a per-thread / per-task override through a context variable (the innermost wins).
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import validate_budget

# ("budget", value) or ("tolerance", value): the innermost override in force.
_OVERRIDE: contextvars.ContextVar[tuple[str, float] | None] = contextvars.ContextVar(
    "dyncompile_budget", default=None)


def validate_tolerance(value: Any) -> float:
    """Return the tolerance as a float in (0, 1), or raise ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 < float(value) < 1.0):
        raise ValueError(f"tolerance must be a number in (0, 1) (the mean quality loss "
                         f"allowed: 1 - cosine, or the top-1 disagreement), got {value!r}")
    return float(value)


class budget:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Run the enclosed calls of optimized models under this budget.

    >>> with dyncompile.budget(0.3):
    ...     out = opt(**inputs)
    """

    def __init__(self, value: float) -> None:
        self.value = validate_budget(value)
        self._token: contextvars.Token | None = None

    def __enter__(self) -> budget:
        self._token = _OVERRIDE.set(("budget", self.value))
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._token is not None
        _OVERRIDE.reset(self._token)


class tolerance(budget):  # noqa: N801
    """Run the enclosed calls of optimized models at the cheapest planned point whose
    quality loss is certified within ``value`` (see ``DynModule.tolerance``).

    >>> with dyncompile.tolerance(0.02):
    ...     out = opt(**inputs)
    """

    def __init__(self, value: float) -> None:
        self.value = validate_tolerance(value)
        self._token = None

    def __enter__(self) -> tolerance:
        self._token = _OVERRIDE.set(("tolerance", self.value))
        return self


def current_budget(default: float = 1.0) -> float:
    """The budget in force here: the innermost ``with budget(...)`` or ``default``."""
    value = _OVERRIDE.get()
    return default if value is None or value[0] != "budget" else value[1]


def current_override() -> tuple[str, float] | None:
    """The innermost ``with budget(...)`` / ``with tolerance(...)`` in force, or None."""
    return _OVERRIDE.get()


@dataclass(frozen=True)
class RowBudgets:
    """Budgets per token row of one call: the distinct ``levels`` and, for each row of
    the call's tokens (flattened to 2-D), the position of its level in ``levels``."""

    levels: tuple[float, ...]
    index: torch.Tensor  # int64 [rows]

    @staticmethod
    def of(budgets: Any) -> RowBudgets:
        """From one budget per row (a sequence or a 1-D tensor), each in (0, 1]."""
        values = [float(b) for b in (budgets.tolist() if isinstance(budgets, torch.Tensor)
                                     else budgets)]
        levels = tuple(sorted(set(values)))
        for b in levels:
            validate_budget(b)
        at = {b: i for i, b in enumerate(levels)}
        return RowBudgets(levels, torch.tensor([at[b] for b in values], dtype=torch.int64))


class BudgetState:
    """Budget shared by the graphs of one compiled model.

    ``value`` is the budget in force for the running call: ``sync()`` sets it before
    each call, and the forms' ops read it (through ``get_state(id)``). ``lock``
    serialises calls so two threads with different budgets never interleave.
    """

    def __init__(self, default: float = 1.0) -> None:
        self.default = validate_budget(default)
        self.value = self.default
        # The model's default quality tolerance (None: the budget rules).
        self.tolerance: float | None = None
        # Turns (budget or tolerance) into every form's knob; None: each knob is the budget.
        self.plan: Any = None
        # Knobs set by calibration and planning (measuring one setting), beating the plan.
        self.forced: dict[str, float] | None = None
        # Each form's knob for the running call.
        self.knobs: dict[str, float] = {}
        # Budgets per token row for the running call (an engine serving requests that
        # carry their own budgets), or None: every row at ``value``. Forms that support
        # it read ``row_knobs``; the others run the call at ``value``.
        self.rows: RowBudgets | None = None
        # Tokens of the running call, when the caller knows them (the plan's size class).
        self.call_tokens: int | None = None
        self.lock = threading.RLock()
        self.calibrating = False
        # Calibrate on a graph's first inputs when nothing else will (the bare backend);
        # an optimized model calibrates through its own calls instead.
        self.auto_calibrate = True
        self.forms: dict[str, Any] = {}
        # What each form rewrote, over every graph compiled for this state (names, in order).
        self.rewritten: dict[str, dict[str, None]] = {}
        self.id = next(_ids)
        _STATES[self.id] = self

    def pending_calibration(self) -> list[str]:
        """Forms whose runtime data still needs calibration."""
        return [n for n, rt in self.forms.items() if not getattr(rt, "calibrated", True)]

    def finalize_calibration(self) -> None:
        """Turn the samples gathered while calibrating into each form's tables."""
        for rt in self.forms.values():
            if hasattr(rt, "finalize"):
                rt.finalize()

    def refine_calibration(self, run_at: Callable[[float], None]) -> None:
        """Let forms that need it re-fit on the calibration data run at given knobs.

        ``run_at(b)`` runs the calibration inputs; a form's ``refine(run_at)`` records
        what its ops see under its own approximations at its knob ``b`` (inputs shift
        once earlier layers are sparse), every other form dense.
        """
        for name, rt in self.forms.items():
            if hasattr(rt, "refine"):
                rt.refine(lambda b, name=name: self.run_forced({name: b}, run_at, b))

    def run_forced(self, knobs: dict[str, float], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with these knobs in force (forms not named: 1.0, dense)."""
        saved = self.forced
        self.forced = {**dict.fromkeys(self.forms, 1.0), **knobs}
        try:
            return fn(*args)
        finally:
            self.forced = saved

    def knob(self, form: str) -> float:
        """The knob of ``form`` for the running call (1.0: dense)."""
        return self.knobs.get(form, self.value)

    def row_knobs(self, form: str) -> list[float] | None:
        """The knob of ``form`` at each of ``rows.levels`` (None: no per-row budgets, or
        a calibration or planning run forcing the knobs)."""
        if self.rows is None or self.forced is not None:
            return None
        if self.plan is None:
            return list(self.rows.levels)
        out = []
        for level in self.rows.levels:
            value, knobs = self.plan.resolve("budget", level, self.call_tokens)
            out.append(knobs.get(form, value))
        return out

    def form(self, name: str, factory: Callable[[], Any]) -> Any:
        """The runtime data of one form (thresholds, routers...), created on first use."""
        if name not in self.forms:
            self.forms[name] = factory()
        return self.forms[name]

    def sync(self) -> float:
        """Set ``value`` and every form's knob for the call about to run."""
        if self.forced is not None:
            self.value = min(self.forced.values(), default=1.0)
            self.knobs = self.forced
            return self.value
        over = current_override()
        if over is not None:
            kind, value = over
        elif self.tolerance is not None:
            kind, value = "tolerance", self.tolerance
        else:
            kind, value = "budget", self.default
        if self.plan is None:
            if kind == "tolerance":
                raise RuntimeError("dyncompile: a tolerance needs a plan: calibrate the "
                                   "model first (optimize(..., calibration=batches))")
            self.value, self.knobs = value, {}
            return value
        self.value, self.knobs = self.plan.resolve(kind, value, self.call_tokens)
        return self.value


_ids = itertools.count()
_STATES: weakref.WeakValueDictionary[int, BudgetState] = weakref.WeakValueDictionary()


def get_state(state_id: int) -> BudgetState:
    """The BudgetState with this id (ops receive the id as a graph constant)."""
    try:
        return _STATES[state_id]
    except KeyError:
        raise RuntimeError(f"dyncompile: budget state {state_id} no longer exists") from None
