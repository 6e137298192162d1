"""The form tests check each form's own knob: ``optimize()`` here does not plan, so the
budget a test sets is the form's knob (the planner's tests are in tests/plan and
tests/integration/test_planner.py)."""

import functools

import pytest

import dyncompile


@pytest.fixture(autouse=True)
def _unplanned(monkeypatch):
    monkeypatch.setattr(dyncompile, "optimize",
                        functools.partial(dyncompile.api.optimize, plan=False))
