"""The compute budget as runtime state: a 0-d tensor the compiled graphs read.

Changing the budget writes into that tensor in place, so no value is ever
baked into a compiled graph and nothing recompiles. ``with budget(0.3):`` sets
a per-thread / per-task override through a context variable.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import torch

from ..config import validate_budget

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

    ``tensor`` is a 0-d float32 CPU tensor read by the ops of every form;
    ``sync()`` writes the budget in force into it before each call. ``lock``
    serialises calls so two threads with different budgets never interleave.
    """

    def __init__(self, default: float = 1.0) -> None:
        self.default = validate_budget(default)
        self.tensor = torch.full((), self.default, dtype=torch.float32)
        self.lock = threading.RLock()

    def sync(self) -> float:
        value = current_budget(self.default)
        if float(self.tensor) != value:
            self.tensor.fill_(value)
        return value
