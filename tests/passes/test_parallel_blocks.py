"""Parallel blocks (``h = x + attn(ln(x)) + mlp(ln(x))``: GPT-J, GPT-NeoX, Falcon, Phi):
the blocks detection gives are the ones each form rewrites, and budget 1.0 stays dense."""

import pytest
import torch

import dyncompile
from dyncompile.core.budget import BudgetState
from dyncompile.forms.early_exit.rewrite import EarlyExitForm
from dyncompile.passes.base import PassContext
from dyncompile.passes.detect import detect_blocks
from dyncompile.testing import assert_compute_falls, assert_matches_dense, capture_passes
from dyncompile.testing.zoo import ZOO
from tests.conftest import capture_graphs

SPARSE = "dyncompile.gated_linear.default"
ROUTE = "dyncompile.expert_route.default"
EXPERTS = "dyncompile.expert_ffn.default"
SMALL = {"expert": {"experts": 8, "router_hidden": 8, "router_steps": 50}}


def _snaps(name, method):
    entry = ZOO[name]
    (snaps,) = capture_passes(entry.build(), entry.inputs(1, 4), methods=[method])
    assert [s.after for s in snaps] == ["input", "normalize", "detect", method]
    return snaps


@pytest.mark.parametrize("name,sites", [("parallel", 8), ("gptj", 12), ("falcon", 8)])
def test_gated_rewrites_every_linear_of_both_branches(name, sites):
    """Per layer: the attention's projections (a fused qkv, or q, k, v) and output, and the
    MLP's up and down, all reading the one normalized x."""
    snaps = _snaps(name, "gated")
    detected, after = snaps[-2].op_counts, snaps[-1].op_counts
    assert detected["linear"] == sites and detected[SPARSE] == 0
    assert after[SPARSE] == sites and after["linear"] == 0
    if name == "falcon":   # written as x @ W.T: detection made them linears first
        assert snaps[0].op_counts["matmul"] == sites and snaps[0].op_counts["linear"] == 0


@pytest.mark.parametrize("name,linears", [("parallel", 8), ("parallel-2norm", 10),
                                          ("falcon", 8), ("gpt-neox-parallel", 8)])
def test_expert_turns_each_parallel_mlp_into_router_plus_experts(name, linears):
    snaps = _snaps(name, "expert")
    detected, after = snaps[-2].op_counts, snaps[-1].op_counts
    per_mlp = 3 if name == "parallel-2norm" else 2      # gate, up, down or up, down
    assert detected["linear"] == linears and detected[ROUTE] == detected[EXPERTS] == 0
    assert after[ROUTE] == after[EXPERTS] == 2
    assert after["linear"] == linears - 2 * per_mlp    # the attention's linears stay
    assert after["sdpa"] == detected["sdpa"] == 2


def _plan(name):
    entry = ZOO[name]
    cfg = dyncompile.DynConfig(methods=("early_exit",))

    def plan(gm, example):
        ctx = PassContext(config=cfg, example_inputs=example, state=BudgetState())
        ctx.blocks = detect_blocks(gm)
        skips = [r.skip for r in ctx.blocks.residual]
        return gm, EarlyExitForm(cfg).plan(gm, ctx), skips

    return capture_graphs(entry.build(), entry.inputs(2, 6), plan)[0]


@pytest.mark.parametrize("name", ["parallel", "gptj", "falcon", "cohere"])
def test_early_exit_cuts_one_segment_per_parallel_layer(name):
    gm, g, skips = _plan(name)
    assert not isinstance(g, str), g
    assert len(g.segments) == 2 and g.exits == 1
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert sorted(n.name for p in [*g.segments, g.head] for n in p.nodes) == \
        sorted(n.name for n in body)                   # the pieces partition the graph
    # the cut between the layers is the second layer's input: the first layer's sum
    assert skips[1] in g.segments[0].nodes and skips[1] not in g.segments[1].nodes


def _optimize(name, method, **kw):
    entry = ZOO[name]
    torch.manual_seed(0)
    cal = [entry.inputs(4, 8) for _ in range(2)]
    model = entry.build()
    opt = dyncompile.optimize(model, methods=[method], calibration=cal, compiler="eager", **kw)
    return entry, entry.build(), opt


def test_expert_at_budget_one_matches_dense_and_compute_falls():
    """Falcon: a parallel block whose linears were written x @ W.T; the experts are cut
    from (and permute) the parameters themselves."""
    entry, dense, opt = _optimize("falcon", "expert", form_options=SMALL)
    x = entry.inputs(2, 8)
    assert len(opt.report().rewritten["expert"]) == 2
    assert assert_matches_dense(dense, opt, x, atol=1e-5) < 1e-5
    spent = assert_compute_falls(opt, x, budgets=(1.0, 0.5))
    assert spent[0] == 1.0


def test_gated_and_early_exit_at_budget_one_match_dense():
    """The hand-written x + attn(ln(x)) + mlp(ln(x))."""
    for method, rewritten in (("gated", 8), ("early_exit", 1)):
        entry, dense, opt = _optimize("parallel", method)
        x = entry.inputs(2, 8)
        assert len(opt.report().rewritten[method]) == rewritten
        assert assert_matches_dense(dense, opt, x, atol=1e-5) < 1e-5
