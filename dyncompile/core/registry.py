"""The form registry: forms register themselves and are discovered, not listed.

A form is a :class:`~dyncompile.passes.base.Pass` subclass decorated with
:func:`register_form`, which makes it selectable by its ``name`` in
``methods=[...]``. :func:`forms` finds them the first time it is asked:

- every subpackage of ``dyncompile.forms`` is imported (so a form that ships with
  dyncompile is one new folder, ``dyncompile/forms/<name>/``, and no existing file
  changes);
- every ``dyncompile.forms`` entry point of the installed distributions is loaded
  (a module or the form class itself), so a form can live in another package::

      [project.entry-points."dyncompile.forms"]
      my_form = "my_package.my_form"

A form from an entry point that fails to import is logged and left out; the
others still load.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..passes.base import Pass

log = logging.getLogger("dyncompile")

ENTRY_POINT_GROUP = "dyncompile.forms"
_BUILTIN_PACKAGE = "dyncompile.forms"

_FORMS: dict[str, type[Pass]] = {}
_discovered = False
_lock = threading.RLock()


def register_form(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a form selectable by its ``name`` in ``methods=[...]``."""
    with _lock:
        if cls.name in _FORMS and _FORMS[cls.name] is not cls:
            raise ValueError(f"form {cls.name!r} is already registered")
        _FORMS[cls.name] = cls
    return cls


def unregister_form(name: str) -> None:
    """Remove a form (for tests that register a temporary one)."""
    with _lock:
        _FORMS.pop(name, None)


def forms() -> dict[str, type[Pass]]:
    """Every registered form by name, discovering them on first use."""
    global _discovered
    if not _discovered:
        with _lock:
            if not _discovered:
                _discovered = True
                _discover()
    return _FORMS


def _discover() -> None:
    package = importlib.import_module(_BUILTIN_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.ispkg:  # a form that ships with dyncompile: a failure is a bug, raise it
            importlib.import_module(f"{_BUILTIN_PACKAGE}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _load(ep.name, _load_entry_point, ep)


def _load_entry_point(ep) -> None:
    obj = ep.load()
    if isinstance(obj, type) and getattr(obj, "name", None):
        register_form(obj)


def _load(what: str, fn, arg) -> None:
    try:
        fn(arg)
    except Exception as e:  # noqa: BLE001  (one broken form must not hide the others)
        log.warning("dyncompile: form %s could not be loaded (%s: %s)", what,
                    type(e).__name__, e)
