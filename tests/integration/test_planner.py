"""One budget, every form: the bare call, ownership, the plan, tolerances, save / load."""

import warnings

import pytest
import torch
from torch import nn

import dyncompile
from dyncompile.plan.quality import row_losses
from dyncompile.testing import assert_matches_dense, assert_no_recompile, capture_passes
from dyncompile.testing.zoo import ZOO

EXPERT = {"expert": {"experts": 4, "router_steps": 30}}


def _llama():
    entry = ZOO["llama"]
    return entry, entry.build().eval()


def test_every_form_owns_its_blocks_and_none_is_rewritten_twice():
    entry, model = _llama()
    (snaps,) = capture_passes(model, entry.inputs(2, 6),
                              methods=["gated", "expert", "early_exit"], form_options=EXPERT)
    # forms run in ownership order: expert (FFN blocks), gated (linears left), early exit
    assert [s.after for s in snaps] == ["input", "normalize", "detect", "expert", "gated",
                                        "early_exit"]
    before = snaps[2].op_counts
    after_expert, after_gated = snaps[3].op_counts, snaps[4].op_counts
    assert after_expert["dyncompile.expert_ffn.default"] == 2          # both FFNs
    assert after_expert["linear"] == before["linear"] - 2 * 3         # gate, up, down each
    # gated takes the 4 attention projections of each layer, nothing of the FFNs
    assert after_gated["dyncompile.gated_linear.default"] == 2 * 4
    assert after_gated["dyncompile.expert_ffn.default"] == 2
    assert after_gated["linear"] == after_expert["linear"] - 2 * 4
    code = snaps[4].code
    assert "mlp" not in "".join(ln for ln in code.splitlines() if "gated_linear" in ln)


def _calibrated(model, entry, methods, n=6, **kw):
    cal = [entry.inputs(4, 8) for _ in range(n)]
    return dyncompile.optimize(model, methods=methods, calibration=cal, compiler="eager",
                               form_options=EXPERT if methods is None or "expert" in methods
                               else None, **kw)


@pytest.mark.parametrize("methods", [None, ["gated", "expert"], ["expert", "early_exit"]])
def test_budget_one_equals_dense_and_compute_falls_for_every_mix(methods):
    entry, model = _llama()
    opt = _calibrated(model, entry, methods)
    x = entry.inputs(4, 8)
    assert assert_matches_dense(model, opt, x, atol=1e-5) < 1e-5
    report = opt.report()
    assert all(report.rewritten[m] for m in (methods or ["expert", "gated"]))
    spent = {}
    with torch.no_grad():
        for b in (1.0, 0.75, 0.5):
            with dyncompile.budget(b):
                opt(**x)
            spent[b] = opt.stats.fraction
    assert spent[1.0] == pytest.approx(1.0)
    assert spent[0.5] < spent[0.75] < 1.0
    assert_no_recompile(opt, x)


def test_the_bare_call_applies_every_form_and_plans_on_the_first_call():
    entry, model = _llama()
    opt = dyncompile.optimize(model, budget=0.6, compiler="eager", form_options=EXPERT)
    assert set(opt.config.methods) == set(dyncompile.default_methods())
    # every form but those applied only when named (token: not in the planner's mix yet)
    assert set(dyncompile.known_methods()) - set(opt.config.methods) == {"token"}
    x = entry.inputs(4, 8)
    with pytest.warns(UserWarning, match="first call"), torch.no_grad():
        opt(**x)
    assert opt.plan is not None
    with torch.no_grad():
        opt(**x)
    assert opt.stats.fraction < 0.9
    assert opt.report().rewritten["expert"]


def test_spent_lands_near_the_budget_on_calibration_like_data():
    entry, model = _llama()
    opt = _calibrated(model, entry, None, n=9)
    lowest = opt.plan.frontier()[0].flops
    x = entry.inputs(4, 8)
    with torch.no_grad():
        for b in (0.9, 0.8, 0.7):
            if b < lowest:
                continue
            with dyncompile.budget(b):
                opt(**x)
            assert opt.stats.fraction <= b + 0.05, (b, opt.stats.fraction)


class _Mlp(nn.Module):
    """A plain MLP (no residual): dropping FFN work shows in the output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _rows(seed, n=32):
    return torch.randn(n, 4, 32, generator=torch.Generator().manual_seed(seed))


def test_tolerance_holds_on_fresh_rows_and_refuses_what_it_cannot_certify(tmp_path):
    model = _Mlp().eval()
    cal = [_rows(s) for s in range(9)]                     # 3 batches = 96 rows held out
    opt = dyncompile.optimize(model, methods=["expert"], calibration=cal, compiler="eager",
                              tolerance=0.3, form_options=EXPERT)
    cert = opt.certify(0.3)
    assert cert.rows == 96 and cert.bound <= 0.3
    assert cert.point.flops < 0.9                          # it did buy something
    fresh = _rows(100, 256)
    with torch.no_grad():
        dense = model(fresh)
        out = opt(fresh)
        assert row_losses(dense, out).mean() <= 0.3
        spent_tol = opt.stats.fraction
        with dyncompile.tolerance(0.5):
            opt(fresh)
        assert opt.stats.fraction <= spent_tol + 1e-9      # a looser tolerance spends less
        before = dyncompile.compile_count()
        with dyncompile.budget(0.5):
            opt(fresh)
        with dyncompile.tolerance(0.15):
            opt(fresh)
        assert dyncompile.compile_count() == before        # no recompile
    with pytest.raises(ValueError, match="needs at least"):
        opt.tolerance = 0.01
    with pytest.raises(ValueError, match="budget or a tolerance"):
        dyncompile.optimize(model, budget=0.5, tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance must be"):
        dyncompile.tolerance(1.5)
    opt.save(tmp_path / "plan")
    again = dyncompile.load(model, tmp_path / "plan", compiler="eager")
    assert again.plan.points == opt.plan.points and again.tolerance == 0.3
    with torch.no_grad():
        torch.testing.assert_close(again(fresh), opt(fresh))
        with dyncompile.budget(0.6):
            a = opt(fresh)
            b = again(fresh)
    torch.testing.assert_close(a, b)


def test_a_form_chosen_for_the_user_that_finds_nothing_does_not_warn():
    entry = ZOO["mlp"]
    model = entry.build().eval()
    cal = [entry.inputs(4, 8) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = dyncompile.optimize(model, calibration=cal, compiler="eager",
                                  form_options=EXPERT)
    assert opt.report().rewritten["expert"] and not opt.report().rewritten["early_exit"]


def test_quality_option_plans_on_the_measure_the_user_names():
    model = _Mlp().eval()
    cal = [_rows(s) for s in range(6)]
    seen = []

    def worst_position(dense, out):                        # the whole outputs reach it
        seen.append((type(dense), tuple(out.shape)))
        return (1 - torch.cosine_similarity(dense, out, dim=-1)).clamp(0, 1).amax(-1)

    opt = dyncompile.optimize(model, methods=["expert"], calibration=cal, compiler="eager",
                              form_options=EXPERT, quality=worst_position)
    assert seen and seen[0] == (torch.Tensor, (32, 4, 32))
    top1 = dyncompile.optimize(model, methods=["expert"], calibration=cal, compiler="eager",
                               form_options=EXPERT, quality="top1", tolerance=0.6)
    fresh = _rows(100, 256)
    with torch.no_grad():
        flips = row_losses(model(fresh), top1(fresh), quality="top1").mean()
    assert flips <= 0.6 and top1.certify(0.6).point.flops < 1.0
    # the plans differ: each ranks points by its own measure
    assert [p.loss for p in opt.plan.points] != [p.loss for p in top1.plan.points]
    with pytest.raises(ValueError, match="quality must be one of"):
        dyncompile.optimize(model, quality="kl")


def test_decode_sized_calls_get_their_own_plan():
    """Batches larger than a decode step also plan on decode-sized pieces of themselves:
    gated saves nothing on 32-token calls (its kernel skips rows only for a few tokens)
    but does on 4-token ones, so a budget picks different knobs per size class."""
    from dyncompile.plan.frontier import SMALL_CALL_TOKENS, Plan

    entry, model = _llama()
    opt = _calibrated(model, entry, ["gated", "expert"])
    plan = opt.plan
    assert plan.small is not None and plan.small.small is None
    large, small = plan.resolve("budget", 0.5, 32)[1], plan.resolve("budget", 0.5, 4)[1]
    assert small.get("gated", 1.0) < 1.0
    assert large != small
    assert plan.for_tokens(SMALL_CALL_TOKENS) is plan.small
    assert plan.for_tokens(SMALL_CALL_TOKENS + 1) is plan
    assert "decode-sized" in plan.table()
    few = entry.inputs(1, 4)
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(**few)
    assert opt.state.knobs == small and opt.stats.fraction < 0.8
    # the small frontier counts FLOPs as each token row alone: a 1-token call spends
    # about what its point measured
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(**entry.inputs(1, 1))
    point = plan.small.point_for_budget(0.5)
    assert abs(opt.stats.fraction - point.flops) < 0.12, (opt.stats.fraction, point)
    assert assert_matches_dense(model, opt, few, atol=1e-5) < 1e-5  # budget 1.0
    again = Plan.from_dict(plan.to_dict())
    assert again.small is not None and again.resolve("budget", 0.5, 4)[1] == small
    # generate(): every decode step is one token, so it runs the small plan
    prompt = entry.inputs(1, 6)["input_ids"]
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=4, do_sample=False)
        out = opt.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(ref, out)
        with dyncompile.budget(0.5):
            opt.generate(prompt, max_new_tokens=4, do_sample=False)
    assert opt.stats.fraction < 0.9
