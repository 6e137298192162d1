"""DynConfig: what the ``dyn`` backend and ``optimize()`` do, validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_COMPILERS = ("inductor", "eager")
BUDGET_UNITS = ("flops", "time")


def validate_budget(value: Any) -> float:
    """Return the budget as a float in (0, 1], or raise ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value)
            else:
                raise TypeError
        except TypeError:
            raise ValueError(
                f"budget must be a number in (0, 1] (fraction of dense FLOPs), got {value!r}"
            ) from None
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"budget must be a number in (0, 1] (fraction of dense FLOPs), got {value!r}"
        )
    return value


def known_methods() -> list[str]:
    """Names of the registered forms, for ``methods=[...]``."""
    from .registry import forms

    return sorted(forms())


def default_methods() -> list[str]:
    """The forms ``optimize()`` applies (and the planner mixes) when no methods are named:
    every registered form whose ``automatic`` is true."""
    from .registry import forms

    return sorted(n for n, f in forms().items() if getattr(f, "automatic", True))


def validate_methods(methods: Any) -> tuple[str, ...]:
    """Return methods as a tuple of registered form names, or raise ValueError listing them."""
    if methods is None:
        return ()
    if isinstance(methods, str):
        methods = [methods]
    try:
        methods = list(methods)
    except TypeError:
        raise ValueError(f"methods must be a list of names, got {methods!r}") from None
    known = known_methods()
    for m in methods:
        if m not in known:
            listed = ", ".join(known) if known else "none registered yet"
            raise ValueError(f"unknown method {m!r}; known methods: {listed}")
    return tuple(dict.fromkeys(methods))


def validate_form_options(form_options: Any) -> None:
    """Raise ValueError for an unknown form, option or option value (each form's typed
    options name what is allowed)."""
    from .registry import forms

    registry = forms()
    if not isinstance(form_options, Mapping):
        raise ValueError(f"form_options must be a dict {{form: {{option: value}}}}, "
                         f"got {form_options!r}")
    for form, opts in form_options.items():
        if form not in registry:
            raise ValueError(f"form_options names unknown form {form!r}; known: "
                             f"{', '.join(sorted(registry))}")
        registry[form].parse_options(opts)


@dataclass(frozen=True)
class DynConfig:
    """Options of the ``dyn`` backend.

    budget: default fraction of dense FLOPs to spend (0, 1]; can change per call.
    methods: adaptive forms to apply (names from ``dyncompile.known_methods()``).
    compiler: "inductor" (default) or "eager" (run the rewritten graph as is).
    form_options: per-form settings, ``{"expert": {...}}``; each form checks its own
        (a typed dataclass, see ``dyncompile.core.options``).
    budget_unit: "flops" (the budget is a fraction of the dense FLOPs) or "time" (of the
        dense model's time on this device, as measured while planning).
    auto: the methods were chosen for the user (``methods=None``): a form that finds
        nothing to rewrite is left out without a warning.
    """

    budget: float = 1.0
    methods: tuple[str, ...] = ()
    compiler: str = "inductor"
    form_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    budget_unit: str = "flops"
    auto: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", validate_budget(self.budget))
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got "
                             f"{self.budget_unit!r}")
        object.__setattr__(self, "methods", validate_methods(self.methods))
        if self.compiler not in _COMPILERS:
            raise ValueError(f"compiler must be one of {_COMPILERS}, got {self.compiler!r}")
        validate_form_options(self.form_options)
        unused = [f for f in self.form_options if f not in self.methods]
        if unused:
            raise ValueError(
                f"form_options names {', '.join(map(repr, unused))}, not in methods "
                f"{list(self.methods)}: add it to methods or drop its options")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> DynConfig:
        """Build from ``torch.compile(..., options={...})``; unknown keys raise ValueError."""
        options = dict(options or {})
        allowed = {"budget", "methods", "compiler", "form_options", "budget_unit", "auto"}
        unknown = set(options) - allowed - {"state"}
        if unknown:
            raise ValueError(
                f"unknown dyn option(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        options.pop("state", None)
        return cls(**options)

    def options_for(self, form: str) -> Any:
        """The typed options of ``form`` (its ``Options`` dataclass, defaults filled in)."""
        from .registry import forms

        return forms()[form].parse_options(self.form_options.get(form))
