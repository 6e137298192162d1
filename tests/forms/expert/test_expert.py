"""Form ``expert``: the rewrite (ops counted), fitting, budget 1.0 = dense, save and load."""

import pytest
import torch

import dyncompile
from dyncompile.forms.expert.rewrite import identify_activation
from dyncompile.testing import (
    assert_compute_falls,
    assert_matches_dense,
    assert_no_recompile,
    capture_passes,
)
from dyncompile.testing.zoo import ZOO

ROUTE = "dyncompile.expert_route.default"
FFN = "dyncompile.expert_ffn.default"
SMALL = {"expert": {"experts": 8, "router_hidden": 8, "router_steps": 150}}


@pytest.mark.parametrize("name,ffns,linears_per_ffn,act", [
    ("llama", 2, 3, "silu"), ("gpt2", 2, 2, "gelu_tanh"), ("bert", 2, 2, "gelu"),
    ("t5", 4, 2, "relu"), ("mlp", 1, 2, "gelu")])
def test_rewrite_turns_every_ffn_into_router_plus_experts(name, ffns, linears_per_ffn, act):
    entry = ZOO[name]
    (snaps, *_) = capture_passes(entry.build(), entry.inputs(1, 4), methods=["expert"])
    before, after = snaps[-2].op_counts, snaps[-1].op_counts
    assert after[ROUTE] == ffns and after[FFN] == ffns and before[FFN] == 0
    dense_before = before["linear"] + before["addmm"]
    dense_after = after["linear"] + after["addmm"]
    assert dense_before - dense_after == ffns * linears_per_ffn
    assert f"'{act}'" in snaps[-1].code     # the activation the probe identified


def test_identify_activation_on_expanded_and_unknown_regions():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(4)
    cube = g.call_function(torch.pow, (x, 3))
    inner = g.call_function(torch.add, (x, g.call_function(torch.mul, (cube, 0.044715))))
    t = g.call_function(torch.tanh, (g.call_function(torch.mul, (inner, 0.7978845608028654)),))
    out = g.call_function(torch.mul, (g.call_function(torch.mul, (x, 0.5)),
                                      g.call_function(torch.add, (t, 1.0))))
    for n in g.nodes:
        n.meta.setdefault("val", torch.empty(4))
    assert identify_activation(x, out) == "gelu_tanh"
    odd = g.call_function(torch.mul, (out, 2.0))
    odd.meta["val"] = torch.empty(4)
    assert identify_activation(x, odd) is None


def _optimized(name, **kw):
    entry = ZOO[name]
    model = entry.build()
    torch.manual_seed(0)
    cal = [entry.inputs(8, 8) for _ in range(3)]
    opts = kw.pop("form_options", SMALL)
    return entry, model, dyncompile.optimize(model, methods=["expert"], calibration=cal,
                                             compiler="eager", form_options=opts, **kw)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_budget_one_is_dense_and_the_permutation_keeps_the_function(name):
    entry = ZOO[name]
    reference = entry.build()              # an untouched copy (same seed, same weights)
    _, model, opt = _optimized(name)
    inputs = entry.inputs(2, 8)
    # the FFN weights of the optimized copy were permuted, yet it computes the same function
    assert opt.model is not model
    assert assert_matches_dense(reference, opt.model, inputs, atol=1e-5) < 1e-5
    assert assert_matches_dense(reference, opt, inputs, atol=1e-5) < 1e-5
    assert_no_recompile(opt, inputs, budgets=(1.0, 0.8, 0.5, 0.3))


def test_experts_are_contiguous_slices_fitted_from_calibration():
    _, model, opt = _optimized("llama")
    runtime = opt.state.forms["expert"]
    assert len(runtime.sites) == 2
    for site in runtime.sites.values():
        assert site.experts == 8 and site.activation == "silu" and site.glu
        assert sorted(site.perm.tolist()) == list(range(site.hidden))
        assert site.router_error < 1.0            # the router beats predicting zero
        curve = site.curve
        assert curve[0] > 1.0 > curve[-1]         # tau 0: every expert plus the router
        assert bool((curve[1:] <= curve[:-1]).all())


def test_compute_follows_the_budget():
    entry, model, opt = _optimized("llama")
    inputs = entry.inputs(4, 8)
    spent = []
    with torch.no_grad():
        for b in (1.0, 0.75, 0.5, 0.3):
            with dyncompile.budget(b):
                opt(**inputs)
            spent.append(opt.stats.ratio("expert_compute"))
    assert spent[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(spent, spent[1:], strict=False)), spent
    for b, s in zip((0.75, 0.5, 0.3), spent[1:], strict=True):
        assert s == pytest.approx(b, abs=0.15), (b, s)
    assert_compute_falls(opt, entry.inputs(1, 1), budgets=(1.0, 0.6, 0.3))


def test_save_and_load_restore_an_identical_model(tmp_path):
    entry, model, opt = _optimized("gpt2")
    inputs = entry.inputs(2, 8)
    opt.save(tmp_path / "saved")
    fresh = entry.build()                  # original weights, not permuted
    loaded = dyncompile.load(fresh, tmp_path / "saved")
    assert loaded.config.methods == ("expert",)
    with torch.no_grad():
        for b in (1.0, 0.5):
            with dyncompile.budget(b):
                a, c = opt(**inputs).logits, loaded(**inputs).logits
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    for (n1, p1), (n2, p2) in zip(opt.model.named_parameters(),
                                  loaded.model.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)   # the same permutation was applied
    for p1, p2 in zip(fresh.parameters(), entry.build().parameters(), strict=True):
        assert torch.equal(p1, p2)                # and the model given to load() kept its own


def test_save_before_calibration_is_a_clear_error(tmp_path):
    entry = ZOO["mlp"]
    opt = dyncompile.optimize(entry.build(), methods=["expert"], compiler="eager")
    with pytest.raises(RuntimeError, match="calibration"):
        opt.save(tmp_path)
    with pytest.raises(FileNotFoundError):
        dyncompile.load(entry.build(), tmp_path / "missing")


def test_plain_torch_compile_calibrates_on_first_inputs(dyncompile_log):
    entry = ZOO["mlp"]
    model = entry.build()
    reference = entry.build()
    x = entry.inputs(16, 6)
    c = torch.compile(model, backend="dyn", options={
        "methods": ["expert"], "budget": 0.5, "compiler": "eager", "form_options": SMALL})
    with torch.no_grad():
        out = c(*x)
    assert any("calibrating on the first inputs" in m for m in dyncompile_log)
    with torch.no_grad():
        ref = reference(*x)
        assert not torch.allclose(out, ref)      # budget 0.5 really drops experts
        with dyncompile.budget(1.0):
            torch.testing.assert_close(c(*x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts,match", [({"experts": 0}, "positive int"),
                                        ({"routers": 3}, "unknown expert option")])
def test_bad_options_are_clear_errors(opts, match):
    entry = ZOO["mlp"]
    with pytest.raises(ValueError, match=match):
        dyncompile.optimize(entry.build(), methods=["expert"], compiler="eager",
                            form_options={"expert": opts})


class _TwoBlocks(torch.nn.Module):
    """Pre-norm residual FFNs: their inputs are intermediate buffers under Inductor."""

    def __init__(self, d=16, h=64):
        super().__init__()
        torch.manual_seed(0)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.up1, self.down1 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.up2, self.down2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x):
        x = x + self.down1(torch.nn.functional.gelu(self.up1(self.ln1(x))))
        return x + self.down2(torch.nn.functional.gelu(self.up2(self.ln2(x))))


def test_inductor_fit_equals_eager_fit():
    """Calibration samples must be copies: Inductor reuses an op's input buffers."""
    torch.manual_seed(1)
    cal = [(torch.randn(4, 8, 16),) for _ in range(3)]
    fits = []
    for compiler in ("eager", "inductor"):
        opt = dyncompile.optimize(_TwoBlocks().eval(), methods=["expert"], calibration=cal,
                                  compiler=compiler, form_options=SMALL)
        fits.append({n: (s.perm, s.curve) for n, s in opt.state.forms["expert"].sites.items()})
    assert fits[0].keys() == fits[1].keys() and len(fits[0]) == 2
    for name, (perm, curve) in fits[0].items():
        assert torch.equal(perm, fits[1][name][0])
        torch.testing.assert_close(curve, fits[1][name][1], atol=1e-4, rtol=0)
