"""Form ``gated``: the rewrite (ops counted), budget 1.0 = dense, sparsity tracks the budget."""

import pytest
import torch

import dyncompile
from dyncompile.testing import (
    assert_compute_falls,
    assert_matches_dense,
    assert_no_recompile,
    capture_passes,
)
from dyncompile.testing.zoo import ZOO

SPARSE = "dyncompile.gated_linear.default"
CATS = "dyncompile.cats_glu.default"


@pytest.mark.parametrize("name,linears", [("llama", 14), ("gpt2", 8), ("bert", 12),
                                          ("prenorm", 8)])
def test_rewrite_replaces_every_block_linear(name, linears):
    entry = ZOO[name]
    (snaps,) = capture_passes(entry.build(), entry.inputs(1, 4), methods=["gated"])
    before, after = snaps[-2].op_counts, snaps[-1].op_counts
    assert snaps[-1].after == "gated"
    assert before[SPARSE] == 0 and after[SPARSE] == linears
    block_linears = before["linear"] + before["addmm"]
    remaining = after["linear"] + after["addmm"]
    assert block_linears - remaining == linears  # only the head (if any) stays dense


def _optimized(name, **kw):
    entry = ZOO[name]
    model = entry.build()
    cal = [entry.inputs(4, 8) for _ in range(2)]
    return entry, model, dyncompile.optimize(model, methods=["gated"], calibration=cal,
                                             compiler="eager", **kw)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_budget_one_is_dense_and_no_recompile(name):
    entry, model, opt = _optimized(name)
    inputs = entry.inputs(2, 8)
    assert assert_matches_dense(model, opt, inputs, atol=1e-5) < 1e-5
    assert_no_recompile(opt, inputs)


def test_sparsity_tracks_the_budget():
    entry, model, opt = _optimized("llama")
    inputs = entry.inputs(2, 8)
    for b in (1.0, 0.75, 0.5, 0.25):
        with torch.no_grad(), dyncompile.budget(b):
            opt(**inputs)
        active = opt.stats.ratio("active_channels")
        assert active == pytest.approx(b, abs=0.12), (b, active)


def test_compute_falls_in_the_decode_regime():
    entry, model, opt = _optimized("llama")
    fractions = assert_compute_falls(opt, entry.inputs(1, 1), budgets=(1.0, 0.75, 0.5, 0.25))
    assert fractions[0] == 1.0 and fractions[-1] < 0.75


def test_quality_degrades_gracefully():
    entry, model, opt = _optimized("bert")
    inputs = entry.inputs(2, 8)
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        errs = []
        for b in (0.9, 0.5, 0.2):
            with dyncompile.budget(b):
                out = opt(**inputs).last_hidden_state
            errs.append(float((out - ref).norm() / ref.norm()))
    assert 0 < errs[0] < errs[1] < errs[2]


def test_plain_torch_compile_calibrates_on_first_inputs(dyncompile_log):
    entry = ZOO["mlp"]
    model = entry.build()
    x = entry.inputs(2, 6)
    c = torch.compile(model, backend="dyn", options={"methods": ["gated"], "budget": 0.5,
                                                     "compiler": "eager"})
    with torch.no_grad():
        out = c(*x)
    assert any("calibrating on the first inputs" in m for m in dyncompile_log)
    with torch.no_grad():
        ref = model(*x)
    assert not torch.allclose(out, ref)   # budget 0.5 really drops channels
    with torch.no_grad(), dyncompile.budget(1.0):
        torch.testing.assert_close(c(*x), ref, atol=1e-5, rtol=1e-5)


def test_weights_become_input_major_without_changing_values():
    entry, model, opt = _optimized("mlp")
    w = opt.model.fc1.weight
    assert w.stride() == (1, w.shape[0])
    assert model.fc1.weight.is_contiguous()   # the model given to optimize() is unchanged
    ref = ZOO["mlp"].build().fc1.weight
    torch.testing.assert_close(w, ref)


@pytest.mark.slow
def test_gated_under_inductor_matches_dense():
    entry, model, _ = _optimized("gpt2")
    cal = [entry.inputs(4, 8)]
    opt = dyncompile.optimize(model, methods=["gated"], calibration=cal)
    inputs = entry.inputs(1, 8)
    assert_matches_dense(model, opt, inputs, atol=1e-5)
    assert_no_recompile(opt, inputs, budgets=(0.9, 0.7, 0.5, 0.3, 0.2))


class _Handwritten(torch.nn.Module):
    """Linears written as matmuls: x @ W + b and x @ W.t() (square weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(16, 16) / 4)
        self.b1 = torch.nn.Parameter(torch.randn(16))
        self.w2 = torch.nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        return torch.relu(x @ self.w1 + self.b1) @ self.w2.t()


def test_matmul_written_linears_keep_dense_semantics():
    model = _Handwritten().eval()
    x = torch.randn(2, 3, 16)
    (snaps,) = capture_passes(model, (x,), methods=["gated"])
    assert snaps[-1].op_counts[SPARSE] == 2 and snaps[-1].op_counts["matmul"] == 0
    opt = dyncompile.optimize(model, methods=["gated"], calibration=[(x,)], compiler="eager")
    assert assert_matches_dense(model, opt, (x,), atol=1e-5) < 1e-5


def test_cats_rewrites_glu_ffns_into_one_op():
    entry = ZOO["llama"]
    (snaps,) = capture_passes(entry.build(), entry.inputs(1, 4), methods=["gated"],
                              form_options={"gated": {"glu": "cats"}})
    before, after = snaps[-2].op_counts, snaps[-1].op_counts
    layers = 2
    assert after[CATS] == layers                    # one op per GLU FFN
    assert after[SPARSE] == 4 * layers              # q, k, v, o stay gated one by one
    # the gate projections stay dense; up and down are folded into cats_glu
    assert before["linear"] - after["linear"] == 6 * layers


def test_cats_budget_one_is_dense_and_compute_falls():
    entry, model, opt = _optimized("llama", form_options={"gated": {"glu": "cats"}})
    inputs = entry.inputs(2, 8)
    assert assert_matches_dense(model, opt, inputs, atol=1e-5) < 1e-5
    fractions = assert_compute_falls(opt, entry.inputs(1, 1), budgets=(1.0, 0.75, 0.5))
    assert fractions[-1] < 0.8
    assert_no_recompile(opt, inputs, budgets=(0.9, 0.6, 0.4))


def test_greedy_allocation_spends_the_budget_unevenly():
    entry, model, opt = _optimized("bert", form_options={"gated": {"allocation": "greedy"}})
    inputs = entry.inputs(2, 8)
    assert assert_matches_dense(model, opt, inputs, atol=1e-5) < 1e-5
    runtime = opt.state.forms["gated"]
    alloc = runtime.sparsity(0.5)
    costs = runtime.costs
    spent = sum(costs[s].cost * (1 - alloc[s]) for s in alloc) / sum(costs[s].cost for s in alloc)
    assert spent == pytest.approx(0.5, abs=0.01)
    assert max(alloc.values()) - min(alloc.values()) > 0.1   # not uniform
    with torch.no_grad():
        for b in (0.75, 0.5):
            with dyncompile.budget(b):
                opt(**inputs)
            assert opt.stats.ratio("active_channels") == pytest.approx(b, abs=0.15)


def test_unknown_gated_option_is_a_clear_error():
    entry = ZOO["mlp"]
    with pytest.raises(ValueError, match="allocation"):
        dyncompile.optimize(entry.build(), methods=["gated"], compiler="eager",
                            form_options={"gated": {"allocation": "best"}},
                            calibration=[entry.inputs(2, 4)])


def test_wina_criterion_ranks_channels_by_weight_norm_too():
    """criterion="wina": budget 1.0 dense; sparsity tracks the budget; the channels kept
    are the largest |x_i| * ||W[:, i]||, not the largest |x_i|."""
    entry, model, opt = _optimized("llama", form_options={"gated": {"criterion": "wina"}})
    inputs = entry.inputs(2, 8)
    assert assert_matches_dense(model, opt, inputs, atol=1e-5) < 1e-5
    runtime = opt.state.forms["gated"]
    assert runtime.criterion == "wina" and set(runtime.scales) == set(runtime.tables)
    site = next(s for s in runtime.scales if "q_proj" in s)
    weight = dict(model.named_parameters())[site]
    torch.testing.assert_close(runtime.scales[site], weight.detach().norm(dim=0))
    for b in (0.75, 0.5, 0.25):
        with torch.no_grad(), dyncompile.budget(b):
            opt(**inputs)
        assert opt.stats.ratio("active_channels") == pytest.approx(b, abs=0.12), b
    # the thresholds are quantiles of the criterion's score, not of |x|
    plain = _optimized("llama")[2].state.forms["gated"]
    assert not torch.allclose(runtime.tables[site], plain.tables[site])


def test_scope_all_also_gates_linears_outside_detected_blocks():
    entry = ZOO["llama"]
    (blocks,) = capture_passes(entry.build(), entry.inputs(1, 4), methods=["gated"])
    (every,) = capture_passes(entry.build(), entry.inputs(1, 4), methods=["gated"],
                              form_options={"gated": {"scope": "all"}})
    before = every[-2].op_counts["linear"] + every[-2].op_counts["addmm"]
    assert blocks[-1].op_counts[SPARSE] == 14 < before  # the head stays dense
    assert every[-1].op_counts[SPARSE] == before  # every linear, the head too
    assert every[-1].op_counts["linear"] + every[-1].op_counts["addmm"] == 0


class _TokenMLP(torch.nn.Module):
    """Token-wise (no mixing across rows): each output row depends on its input row only."""

    def __init__(self, d=48, h=160):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)
        self.head = torch.nn.Linear(d, 24)

    def forward(self, x):
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.head(x)


def test_per_row_budgets_mask_each_row_at_its_own_budget():
    """``state.rows`` (what a serving engine sets for a batch of requests with their own
    budgets): each row's output equals the same row run with the whole batch at that
    row's budget; rows at 1.0 equal the dense model; the kept pairs fall in between."""
    from dyncompile.core.budget import RowBudgets

    torch.manual_seed(0)
    model = _TokenMLP().eval()
    cal = [torch.randn(16, 48) for _ in range(3)]
    opt = dyncompile.optimize(model, methods=["gated"], calibration=cal, compiler="eager",
                              form_options={"gated": {"scope": "all"}})
    assert len(opt.state.rewritten["gated"]) == 3  # up, down, head
    x = torch.randn(9, 48)
    per_row = [1.0, 0.5, 0.25] * 3
    opt.state.rows = RowBudgets.of(per_row)
    try:
        with torch.no_grad():
            mixed = opt(x)
        kept = opt.stats.ratio("active_channels")
    finally:
        opt.state.rows = None
    with torch.no_grad():
        dense = model(x)
    alone = {}
    for b in (1.0, 0.5, 0.25):
        with torch.no_grad(), dyncompile.budget(b):
            alone[b] = opt(x)
        alone[(b, "kept")] = opt.stats.ratio("active_channels")
    for i, b in enumerate(per_row):
        torch.testing.assert_close(mixed[i], alone[b][i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0::3], dense[0::3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[2::3], dense[2::3], atol=1e-3)
    assert alone[(0.25, "kept")] < kept < alone[(1.0, "kept")]
    with pytest.raises(ValueError, match="budget"):
        RowBudgets.of([1.0, 1.5])


def test_token_spent_counts_each_row_alone():
    """``stats.token_spent_flops``: what the call would spend with each token row run as a
    call of its own. One row: the same as spent; 8 rows whose active channels differ:
    the kernel walks their union (or runs dense), each row alone only its own."""
    entry, model, opt = _optimized("llama")
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(**entry.inputs(1, 1))
        one = opt.stats
        opt(**entry.inputs(2, 4))
        eight = opt.stats
    assert one.token_fraction == pytest.approx(one.fraction, abs=1e-9) and one.fraction < 0.9
    assert eight.token_fraction < eight.fraction - 0.05
    assert eight.token_fraction == pytest.approx(one.fraction, abs=0.15)


@pytest.mark.parametrize("name,glu", [("llama", "teal"), ("bert", "teal"), ("llama", "cats")])
def test_block_allocation_beats_uniform_on_the_block_outputs(name, glu):
    """allocation="block" (TEAL's): one measured region per FFN and attention block, its
    gated ops counted; budget 1.0 dense; each block spends the budget; on the block
    outputs it measured, its error is below uniform's; the paths save and load."""
    entry, model, opt = _optimized(name, form_options={"gated": {"allocation": "block",
                                                                 "glu": glu}})
    runtime = opt.state.forms["gated"]
    blocks = runtime.blocks
    assert len(blocks) == 4 and set(runtime.block_paths) == set(blocks)  # 2 layers x 2
    sites = [s for p in blocks.values() for s in p.sites]
    assert sorted(sites) == sorted(runtime.tables)  # every site in exactly one block
    ops = [sum(n.target in (torch.ops.dyncompile.gated_linear.default,
                            torch.ops.dyncompile.cats_glu.default)
               for n in p.run.graph.nodes) for p in blocks.values()]
    assert sorted(ops) == sorted(len(p.sites) for p in blocks.values())
    inputs = entry.inputs(2, 8)
    assert assert_matches_dense(model, opt, inputs, atol=1e-5) < 1e-5
    for b in (0.5, 0.3):
        alloc = runtime.sparsity(b)
        for key, probe in blocks.items():
            c = {s: runtime.costs[s] for s in probe.sites}
            spent = sum(c[s].cost * (c[s].fixed + (1 - c[s].fixed) * (1 - alloc[s]))
                        for s in c) / sum(c[s].cost for s in c)
            # (a CATS FFN's dense gate projection bounds what its block can save)
            least = runtime.block_paths[key].points[-1][0]
            assert spent == pytest.approx(max(b, least), abs=0.01)
        checks = [runtime.block_checks[k][b] for k in blocks]
        assert all(path <= uniform * 1.05 for path, uniform in checks)
        assert sum(p for p, _ in checks) < sum(u for _, u in checks)
    assert max(runtime.sparsity(0.5).values()) - min(runtime.sparsity(0.5).values()) > 0.1
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(**inputs)
    assert opt.stats.ratio("active_channels") < 0.8
    tensors, meta = runtime.export()
    again = type(runtime)()
    again.restore(tensors, meta, model)
    assert again.sparsity(0.3) == pytest.approx(runtime.sparsity(0.3))


def test_block_allocation_under_inductor_records_through_the_taps():
    """With Inductor compiling the graph, calibration runs the tapped graph eagerly, so
    every block still gets its recorded inputs and a path."""
    entry = ZOO["llama"]
    model = entry.build()
    opt = dyncompile.optimize(model, methods=["gated"], calibration=[entry.inputs(4, 8)],
                              form_options={"gated": {"allocation": "block"}}, plan=False)
    runtime = opt.state.forms["gated"]
    assert len(runtime.block_paths) == 4
    inputs = entry.inputs(2, 8)
    assert assert_matches_dense(model, opt, inputs, atol=1e-4) < 1e-4
