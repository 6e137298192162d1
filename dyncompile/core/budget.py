"""The compute budget as runtime state, read by the forms' ops at call time.

Each optimized model has one :class:`BudgetState`; its id is a constant of the
compiled graphs and its value is read inside the forms' opaque ops, so no budget
is ever baked into a graph and nothing recompiles when it changes.
``with budget(0.3):`` sets a per-thread / per-task override through a context
variable.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .config import validate_budget

_OVERRIDE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "dyncompile_budget", default=None)


class budget:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Run the enclosed calls of optimized models under this budget.

    >>> with dyncompile.budget(0.3):
    ...     out = opt(**inputs)
    """

    def __init__(self, value: float) -> None:
        self.value = validate_budget(value)
        self._token: contextvars.Token | None = None

    def __enter__(self) -> budget:
        self._token = _OVERRIDE.set(self.value)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._token is not None
        _OVERRIDE.reset(self._token)


def current_budget(default: float = 1.0) -> float:
    """The budget in force here: the innermost ``with budget(...)`` or ``default``."""
    value = _OVERRIDE.get()
    return default if value is None else value


class BudgetState:
    """Budget shared by the graphs of one compiled model.

    ``value`` is the budget in force for the running call: ``sync()`` sets it before
    each call, and the forms' ops read it (through ``get_state(id)``). ``lock``
    serialises calls so two threads with different budgets never interleave.
    """

    def __init__(self, default: float = 1.0) -> None:
        self.default = validate_budget(default)
        self.value = self.default
        self.lock = threading.RLock()
        self.calibrating = False
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
        """Let forms that need it re-fit on the calibration data run at given budgets.

        ``run_at(b)`` runs the calibration inputs with budget ``b`` in force; a
        form's ``refine(run_at)`` records what its ops see under its own
        approximations (inputs shift once earlier layers are sparse).
        """
        for rt in self.forms.values():
            if hasattr(rt, "refine"):
                rt.refine(run_at)

    def form(self, name: str, factory: Callable[[], Any]) -> Any:
        """The runtime data of one form (thresholds, routers...), created on first use."""
        if name not in self.forms:
            self.forms[name] = factory()
        return self.forms[name]

    def sync(self) -> float:
        self.value = current_budget(self.default)
        return self.value


_ids = itertools.count()
_STATES: weakref.WeakValueDictionary[int, BudgetState] = weakref.WeakValueDictionary()


def get_state(state_id: int) -> BudgetState:
    """The BudgetState with this id (ops receive the id as a graph constant)."""
    try:
        return _STATES[state_id]
    except KeyError:
        raise RuntimeError(f"dyncompile: budget state {state_id} no longer exists") from None
