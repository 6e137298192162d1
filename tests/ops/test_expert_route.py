"""expert_route: the router's CPU fast path equals the torch selection; the op records,
runs every expert at budget 1.0, routes below it; opcheck."""

import pytest
import torch

import dyncompile.forms.expert.ops  # noqa: F401  (registers the op)
from dyncompile.core.budget import BudgetState
from dyncompile.forms.expert.fit import Router, compute_curve, select
from dyncompile.forms.expert.rewrite import ExpertRuntime, ExpertSite
from dyncompile.ops.expert_route import cpu
from dyncompile.ops.expert_route.cpu import kernel_available, route_mask, router_scores

op = torch.ops.dyncompile.expert_route

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C++ compiler")


def _router(d, experts, hidden, seed=0):
    torch.manual_seed(seed)
    r = Router(d, experts, hidden).eval().requires_grad_(False)
    with torch.no_grad():
        r.fc2.bias.uniform_(-0.2, 0.5)  # some scores clamp to 0 (a row may be all zero)
    return r


def _agree(fast, ref, scores, tau):
    """Equal, except where a score is within float rounding of its row's threshold."""
    thr = tau * scores.max(-1, keepdim=True).values
    near = (scores - thr).abs() <= 1e-5 * (1 + thr.abs())
    assert torch.equal(fast[~near], ref[~near])


@needs_kernel
@pytest.mark.parametrize("n, d, experts, hidden", [(1, 5, 3, 7), (37, 19, 24, 33),
                                                   (301, 64, 5, 128), (9, 8, 33, 4),
                                                   (6, 33, 2, 70)])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("route", ["route_tokens-native", "route_tokens-portable",
                                   "matmul+route_select"])
def test_fast_path_equals_torch_selection_on_odd_shapes(n, d, experts, hidden, tau, bf16,
                                                        route, monkeypatch, kernel_build):
    """Both builds (native and portable) run the whole router in one pass, in fp32 and
    bf16 (native bf16 dot products where the build has them, else fp32 tiles on
    bf16-rounded operands)."""
    if route == "matmul+route_select":  # the route taken without the one-pass router
        monkeypatch.setattr(cpu, "_first_layer_kinds", lambda: (False, False))
    else:
        kernel_build(cpu, route.split("-")[1])
        assert cpu._first_layer_kinds() == (True, True)
    r = _router(d, experts, hidden)
    x = torch.randn(n, d) * 2
    with torch.no_grad():
        scores = router_scores(r.fc1, r.fc2, x, bf16)
        fast = route_mask(r.fc1, r.fc2, x, tau, bf16)
    ref = select(scores, tau)
    assert fast is not None and fast.dtype == torch.bool and fast.shape == (n, experts)
    _agree(fast, ref, scores, tau)
    if tau == 0.0:
        assert fast.all()  # every score >= 0 = 0 * max
    # The expert with the highest score always runs (where any score is positive).
    top = scores.argmax(-1)
    assert fast[torch.arange(n), top].all()


def test_bf16_scores_stay_close_to_fp32():
    r = _router(384, 24, 128)
    x = torch.randn(500, 384)
    with torch.no_grad():
        ref, low = r(x), router_scores(r.fc1, r.fc2, x, True)
    assert torch.equal(router_scores(r.fc1, r.fc2, x, False), ref)
    assert not torch.equal(low, ref)  # the bf16 path really ran
    assert (low - ref).abs().max() <= 2e-2 * ref.abs().max()
    # The prepared bf16 weight follows an in-place change of the router.
    with torch.no_grad():
        r.fc1.weight.mul_(2.0)
        again = router_scores(r.fc1, r.fc2, x, True)
    assert not torch.equal(again, low)


def test_bf16_scores_without_biases():
    r = _router(12, 5, 7)
    r.fc1.bias = None
    r.fc2.bias = None
    x = torch.randn(9, 12)
    with torch.no_grad():
        torch.testing.assert_close(router_scores(r.fc1, r.fc2, x, True), r(x),
                                   atol=2e-2 * float(r(x).abs().max()), rtol=0.0)
    assert route_mask(r.fc1, r.fc2, x, 0.5, True) is None  # the fast path needs biases


def test_fast_path_declines_what_it_does_not_cover():
    r = _router(6, 4, 5)
    assert route_mask(r.fc1, r.fc2, torch.randn(3, 6, dtype=torch.float64), 0.5) is None
    rb = _router(6, 4, 5).to(torch.bfloat16)
    assert route_mask(rb.fc1, rb.fc2, torch.randn(3, 6).bfloat16(), 0.5) is None


@pytest.fixture
def state():
    s = BudgetState(1.0)
    rt = s.form("expert", ExpertRuntime)
    site = ExpertSite("s", 4, 8, "gelu", False, {})
    site.router = _router(6, 4, 5)
    with torch.no_grad():
        site.curve = compute_curve(site.router(torch.randn(64, 6)), site.widths,
                                   site.router.flops(), 2.0 * (6 + 6))
    rt.sites["s"] = site
    return s


def test_op_records_runs_every_expert_at_one_and_routes_below(state):
    x = torch.randn(2, 5, 6)
    state.calibrating = True
    assert op(x, state.id, "s", 4).all()
    state.calibrating = False
    rt = state.forms["expert"]
    assert len(rt.samples["s"]) == 1 and rt.samples["s"][0].shape == (10, 6)
    assert op(x, state.id, "s", 4).all()  # budget 1.0: the dense FFN
    state.value = 0.3
    mask = op(x, state.id, "s", 4)
    site = rt.sites["s"]
    x2 = x.reshape(-1, 6)
    with torch.no_grad():
        scores = router_scores(site.router.fc1, site.router.fc2, x2, rt._bf16_router(x2))
    tau = rt.tau("s", 0.3)
    assert 0.0 < tau <= 1.0 and not mask.all()
    _agree(mask, select(scores, tau), scores, tau)
    # While refining, the scores are recorded (the torch path) and the mask is the same.
    rt._recording = {}
    assert torch.equal(op(x, state.id, "s", 4), mask)
    assert torch.equal(rt._recording["s"][0], scores)
    rt._recording = None


@pytest.mark.parametrize("precision, bf16", [("fp32", False), ("bf16", True)])
def test_router_precision_option(state, precision, bf16):
    rt = state.forms["expert"]
    rt.options["router_precision"] = precision
    x = torch.randn(40, 6)
    assert rt._bf16_router(x) is bf16
    assert not rt._bf16_router(x.double())
    state.value = 0.4
    site = rt.sites["s"]
    with torch.no_grad():
        scores = router_scores(site.router.fc1, site.router.fc2, x, bf16)
    tau = rt.tau("s", 0.4)
    _agree(op(x, state.id, "s", 4), select(scores, tau), scores, tau)


@needs_kernel
def test_builds_name_their_vector_class():
    """The native build uses the machine's widest vectors (as torch's own kernels); the
    portable one (same source) the narrower class; both report which."""
    import platform

    cap = torch.backends.cpu.get_cpu_capability()
    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap)
    if want is None and platform.machine().lower() in ("aarch64", "arm64"):
        want = "neon"
    if want is not None:
        assert cpu.kernel_isa() == want
    ext = cpu._EXT.portable()
    if ext is not None:
        assert ext.load().first_layer_kinds()[2] in ("avx2", "neon")
        assert not ext.load().first_layer_kinds()[1]  # no native bf16 in the portable build


def test_opcheck(state):
    state.value = 0.5
    torch.library.opcheck(op, (torch.randn(3, 7, 6), state.id, "s", 4))
    # Inputs that require grad (a training-mode forward): the mask needs no gradient.
    x = torch.randn(5, 6, requires_grad=True)
    torch.library.opcheck(op, (x, state.id, "s", 4))
    assert not op(x, state.id, "s", 4).requires_grad


def test_later_calls_take_the_lane_until_the_router_changes(state):
    assert cpu._first_layer_kinds()[0]
    rt = state.forms["expert"]
    rt.options["router_precision"] = "fp32"
    state.value = 0.4
    x = torch.randn(30, 6)
    first = op(x, state.id, "s", 4)
    assert "s" in rt._lanes  # the first routed call bound the lane
    assert torch.equal(op(x, state.id, "s", 4), first)
    site = rt.sites["s"]
    with torch.no_grad():
        scores = router_scores(site.router.fc1, site.router.fc2, x, False)
    tau = rt.tau("s", 0.4)
    _agree(first, select(scores, tau), scores, tau)
    rt.finalize()  # refitting (or restoring) drops the lanes
    assert not rt._lanes
