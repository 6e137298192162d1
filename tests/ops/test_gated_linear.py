"""gated_linear: records while calibrating, then thresholds |x| at the budget's quantile."""

import pytest
import torch

import dyncompile
import dyncompile.forms.gated.ops  # noqa: F401  (registers the op)
from dyncompile.core.budget import BudgetState
from dyncompile.forms.gated.calibration import interpolate
from dyncompile.forms.gated.rewrite import LEVELS, GatedRuntime
from dyncompile.ops.sparse_linear.reference import sparse_linear_reference

op = torch.ops.dyncompile.gated_linear


@pytest.fixture
def state():
    s = BudgetState(1.0)
    s.form("gated", GatedRuntime)
    return s


def _calibrate(state, x, wt, site="s"):
    state.calibrating = True
    out = op(x, wt, None, state.id, site)
    state.calibrating = False
    state.finalize_calibration()
    return out


def test_interpolate():
    levels = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    values = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    assert interpolate(levels, values, 0.25) == pytest.approx(1.0)
    assert interpolate(levels, values, 0.75) == pytest.approx(3.0)
    assert interpolate(levels, values, -1.0) == 0.0 and interpolate(levels, values, 9) == 4.0


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 33), (64, 2)])
def test_calibrate_then_threshold_matches_quantiles(state, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    wt = torch.randn(shape[-1], 11, generator=g)
    # calibrating: the dense linear, and the sample is recorded
    torch.testing.assert_close(_calibrate(state, x, wt), x @ wt, atol=1e-5, rtol=1e-5)
    for b in (1.0, 0.8, 0.5, 0.2):
        state.value = b
        thr = 0.0 if b == 1.0 else interpolate(
            LEVELS, torch.quantile(x.abs().flatten().double(), LEVELS), 1 - b)
        torch.testing.assert_close(op(x, wt, None, state.id, "s"),
                                   sparse_linear_reference(x, wt, None, thr), atol=1e-5,
                                   rtol=1e-5)
        kept = float((x.abs() >= thr).float().mean())
        assert kept == pytest.approx(b, abs=max(0.15, 2 / x.numel()))


def test_uncalibrated_site_raises(state):
    _calibrate(state, torch.randn(2, 3), torch.randn(3, 4), site="other")
    state.value = 0.5
    with pytest.raises(RuntimeError, match="not calibrated"):
        op(torch.ones(2, 3), torch.randn(3, 4), None, state.id, "missing")


def test_opcheck(state):
    x, wt, b = torch.randn(4, 9), torch.randn(9, 5), torch.randn(5)
    _calibrate(state, x, wt)
    state.value = 0.5
    torch.library.opcheck(op, (x, wt, b, state.id, "s"))
    torch.library.opcheck(op, (x.requires_grad_(), wt.requires_grad_(), b, state.id, "s"))


def test_budget_context_reaches_the_op(state):
    x, wt = torch.randn(8, 16), torch.randn(16, 6)
    _calibrate(state, x, wt)
    with dyncompile.budget(0.5):
        state.sync()
        half = op(x, wt, None, state.id, "s")
    state.sync()
    assert not torch.allclose(half, x @ wt)
    torch.testing.assert_close(op(x, wt, None, state.id, "s"), x @ wt, atol=1e-5, rtol=1e-5)


def test_reports_skipped_flops_and_active_channels(state):
    from dyncompile.core import stats
    from dyncompile.ops.sparse_linear.reference import active_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 200, generator=g)
    wt = torch.randn(200, 50, generator=g)
    _calibrate(state, torch.randn(64, 200, generator=g), wt)
    with dyncompile.budget(0.5):
        state.sync()
        thr = state.forms["gated"].threshold("s", 0.5)
        token = stats.begin_call(0.5)
        stats.record_graph(2.0 * 200 * 50, 0.5)
        y = op(x, wt, None, state.id, "s")
        s = stats.end_call(token)
    k = len(active_rows(x, thr))
    assert 0 < k < 200
    torch.testing.assert_close(y, sparse_linear_reference(x, wt, None, thr), atol=1e-4,
                               rtol=1e-4)
    assert s.spent_flops == pytest.approx(2.0 * k * 50)
    assert s.ratio("active_channels") == pytest.approx(k / 200)
