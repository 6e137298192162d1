"""Adaptive forms: one file per form, each registering itself with ``register_form``.

A form is a pass that rewrites detected blocks into calls to ``dyncompile::*``
ops whose inputs include the runtime budget. Adding a form means adding a file
here (plus its ops under ``dyncompile/ops/``) and importing it below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..base import Pass

FORMS: dict[str, type[Pass]] = {}


def register_form(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a form selectable by its ``name`` in ``methods=[...]``."""
    if cls.name in FORMS and FORMS[cls.name] is not cls:
        raise ValueError(f"form {cls.name!r} is already registered")
    FORMS[cls.name] = cls
    return cls


from . import early_exit, expert, gated  # noqa: E402,F401  (registers the forms)
