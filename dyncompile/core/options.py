"""Typed form options: each form declares a frozen dataclass, built and checked here.

``form_options={"gated": {"glu": "cats"}}`` becomes ``GatedOptions(glu="cats")``
when the :class:`~dyncompile.core.config.DynConfig` is built, so a wrong key or
value fails at once with the allowed ones named. A field's allowed values come
from its metadata: ``choice(...)`` (a fixed set, the default first) or
``check=fn`` (a function returning a complaint or None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def choice(*allowed: Any) -> Any:
    """A field taking one of ``allowed``; the first is the default."""
    return dataclasses.field(default=allowed[0], metadata={"allowed": allowed})


def checked(default: Any, check: Callable[[Any], str | None]) -> Any:
    """A field whose values ``check`` accepts (it returns a complaint, or None)."""
    return dataclasses.field(default=default, metadata={"check": check})


def positive_int(value: Any) -> str | None:
    """Rule: a positive int, or None for the default."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return "must be a positive int"


def build_options(cls: type[T], form: str, raw: Mapping[str, Any] | None) -> T:
    """``cls(**raw)`` after checking every key and value; ValueError names what is allowed."""
    raw = {} if raw is None else raw
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"form_options[{form!r}] must be a dict, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            listed = sorted(fields) or "none"
            raise ValueError(f"unknown {form} option {key!r}; allowed: {listed}")
        allowed = f.metadata.get("allowed")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{form} option {key}={value!r}; allowed: {allowed}")
        check = f.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise ValueError(f"{form} option {key}={value!r}: {problem}")
    return cls(**raw)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a form that takes none."""
