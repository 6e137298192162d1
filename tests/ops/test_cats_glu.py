"""cats_glu: kernel equals the reference on odd shapes; threshold from the budget; opcheck."""

import pytest
import torch
import torch.nn.functional as F

import dyncompile.forms.gated.ops  # noqa: F401  (registers the op)
from dyncompile.core import stats
from dyncompile.core.budget import BudgetState
from dyncompile.forms.gated.rewrite import GatedRuntime
from dyncompile.ops.cats_glu.cpu import cats_glu_cpu, kernel_available
from dyncompile.ops.cats_glu.reference import cats_glu_reference

op = torch.ops.dyncompile.cats_glu


def _case(tokens, d, hid, out, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    wg = torch.randn(hid, d, generator=g) / d ** 0.5
    a = F.silu(x @ wg.t())
    w_up = torch.randn(hid, d, generator=g) / d ** 0.5
    w_down_t = torch.randn(hid, out, generator=g) / hid ** 0.5
    b_up = torch.randn(hid, generator=g) if bias else None
    b_down = torch.randn(out, generator=g) if bias else None
    return a, x, w_up, b_up, w_down_t, b_down


def test_reference_at_zero_threshold_is_the_glu_ffn():
    a, x, w_up, b_up, w_down_t, b_down = _case(3, 12, 20, 7)
    dense = F.linear(a * F.linear(x, w_up, b_up), w_down_t.t(), b_down)
    torch.testing.assert_close(cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, 0.0),
                               dense)


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("shape", [(37, 53, 29), (16, 96, 16)])
@pytest.mark.parametrize("thr", [0.05, 0.2, 10.0])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_kernel_matches_reference(tokens, shape, thr, bias):
    a, x, w_up, b_up, w_down_t, b_down = _case(tokens, *shape, bias=bias)
    y, k, pairs, sparse = cats_glu_cpu(a, x, w_up, b_up, w_down_t, b_down, thr, 16, 0.85)
    ref = cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, thr)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    mask = a.abs() >= thr
    assert pairs == int(mask.sum()) and k == int(mask.any(0).sum())
    if kernel_available():
        assert sparse == (tokens <= 16 and k <= 0.85 * shape[1])


def _state(a, x, w_up, b_up, w_down_t, b_down):
    s = BudgetState(1.0)
    s.form("gated", GatedRuntime)
    s.calibrating = True
    op(a, x, w_up, b_up, w_down_t, b_down, s.id, "ffn")
    s.calibrating = False
    s.finalize_calibration()
    return s


def test_op_thresholds_at_the_budget_and_reports_savings():
    case = _case(1, 40, 64, 24)
    s = _state(*_case(32, 40, 64, 24, seed=1))
    s.value = 1.0
    ref = cats_glu_reference(*case, 0.0)
    torch.testing.assert_close(op(*case, s.id, "ffn"), ref, atol=1e-5, rtol=1e-5)
    s.value = 0.4
    token = stats.begin_call(0.4)
    y = op(*case, s.id, "ffn")
    st = stats.end_call(token)
    thr = s.forms["gated"].threshold("ffn", 0.4)
    assert thr > 0
    torch.testing.assert_close(y, cats_glu_reference(*case, thr), atol=1e-5, rtol=1e-5)
    kept = int((case[0].abs() >= thr).sum())
    assert st.ratio("active_channels") == pytest.approx(kept / 64)
    assert -st.spent_flops == pytest.approx(2.0 * (64 - kept) * (40 + 24))


def test_leading_dims_and_opcheck():
    a, x, w_up, b_up, w_down_t, b_down = _case(6, 10, 18, 5)
    s = _state(a, x, w_up, b_up, w_down_t, b_down)
    s.value = 0.5
    a3, x3 = a.reshape(2, 3, 18), x.reshape(2, 3, 10)
    out = op(a3, x3, w_up, b_up, w_down_t, b_down, s.id, "ffn")
    assert out.shape == (2, 3, 5)
    thr = s.forms["gated"].threshold("ffn", 0.5)
    torch.testing.assert_close(out.reshape(6, 5),
                               cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, thr),
                               atol=1e-5, rtol=1e-5)
    torch.library.opcheck(op, (a3, x3, w_up, b_up, w_down_t, b_down, s.id, "ffn"),
                          test_utils=("test_schema", "test_faketensor"))
