"""gate_threshold: records while calibrating, then maps the budget to a threshold."""

import pytest
import torch

import dyncompile
from dyncompile.ops.gate_threshold import op as _op  # noqa: F401
from dyncompile.ops.gate_threshold.reference import interpolate
from dyncompile.passes.rewrite.gated import LEVELS, GatedRuntime
from dyncompile.runtime.budget import BudgetState

op = torch.ops.dyncompile.gate_threshold


@pytest.fixture
def state():
    s = BudgetState(1.0)
    s.form("gated", GatedRuntime)
    return s


def test_interpolate_reference():
    levels = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    values = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    assert interpolate(levels, values, 0.25) == pytest.approx(1.0)
    assert interpolate(levels, values, 0.75) == pytest.approx(3.0)
    assert interpolate(levels, values, -1.0) == 0.0 and interpolate(levels, values, 9) == 4.0


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 33), (64, 2)])
def test_calibrate_then_threshold_matches_quantiles(state, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    state.calibrating = True
    assert float(op(x, state.id, "site")) == 0.0
    state.calibrating = False
    state.finalize_calibration()
    for b in (1.0, 0.8, 0.5, 0.2):
        state.value = b
        thr = float(op(x, state.id, "site"))
        if b == 1.0:
            assert thr == 0.0
        else:
            expected = interpolate(LEVELS, torch.quantile(x.abs().flatten().double(), LEVELS),
                                   1 - b)
            assert thr == pytest.approx(expected, rel=1e-5)
            kept = float((x.abs() >= thr).float().mean())
            assert kept == pytest.approx(b, abs=max(0.15, 2 / x.numel()))


def test_uncalibrated_site_raises(state):
    state.value = 0.5
    state.forms["gated"].tables["other"] = torch.zeros(100, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not calibrated"):
        op(torch.ones(2, 3), state.id, "missing")


def test_opcheck(state):
    state.calibrating = True
    op(torch.randn(4, 9), state.id, "s")
    state.calibrating = False
    state.finalize_calibration()
    state.value = 0.5
    torch.library.opcheck(op, (torch.randn(4, 9), state.id, "s"))


def test_budget_context_reaches_the_op(state):
    x = torch.randn(8, 16)
    state.calibrating = True
    op(x, state.id, "s")
    state.calibrating = False
    state.finalize_calibration()
    with dyncompile.budget(0.5):
        state.sync()
        half = float(op(x, state.id, "s"))
    state.sync()
    assert half > 0 and float(op(x, state.id, "s")) == 0.0
