"""Form ``early_exit``: the cut (pieces counted), calibration, budget 1.0 = dense,
rows leaving the batch, decoding with filled caches, save and load."""

import pytest
import torch
import transformers

import dyncompile
from dyncompile.core.budget import BudgetState
from dyncompile.forms.early_exit.fit import QualityMap, ThresholdCurve, exit_layers, isotonic
from dyncompile.forms.early_exit.rewrite import EarlyExitForm, fit_affine
from dyncompile.module import call_batch
from dyncompile.passes.base import PassContext
from dyncompile.passes.detect import detect_blocks
from dyncompile.program.rows import fixed_layouts, row_major
from dyncompile.testing import assert_matches_dense, compare_outputs
from dyncompile.testing.zoo import ZOO
from tests.conftest import capture_graphs

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_hidden_layers=4, vocab_size=99, max_position_embeddings=64)


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**SMALL)).eval()


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_key_value_heads=2, **SMALL)).eval()


def _ids(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _plan(model, inputs):
    cfg = dyncompile.DynConfig(methods=("early_exit",))

    def plan(gm, example):
        ctx = PassContext(config=cfg, example_inputs=example,
                          state=BudgetState())
        ctx.blocks = detect_blocks(gm)
        return gm, EarlyExitForm(cfg).plan(gm, ctx), list(example)

    return capture_graphs(model, inputs, plan)[0]


@pytest.mark.parametrize("name,layers,signal", [
    ("bert", 2, "convergence"), ("llama", 2, "confidence"), ("gpt2", 2, "confidence"),
    ("distilbert", 2, "convergence"), ("prenorm", 2, "convergence")])
def test_cut_gives_one_segment_per_layer_and_keeps_every_node(name, layers, signal):
    entry = ZOO[name]
    gm, g, _ = _plan(entry.build().eval(), entry.inputs(2, 6))
    assert not isinstance(g, str), g
    assert len(g.segments) == layers and g.exits == layers - 1 and g.signal == signal
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    pieces = [n for p in [*g.segments, g.head] for n in p.nodes]
    assert sorted(n.name for n in pieces) == sorted(n.name for n in body)  # a partition
    # Each segment holds one layer's linears; the head holds what follows the last one.
    per_segment = [sum(1 for n in p.nodes if n in detect_blocks(gm).linears) for p in g.segments]
    assert len(set(per_segment[1:])) == 1 and per_segment[0] >= per_segment[1]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_pieces_run_in_order_reproduce_the_graph(name):
    entry = ZOO[name]
    gm, g, example = _plan(entry.build().eval(), entry.inputs(2, 6))
    env = dict(zip(g.placeholders, example))
    with torch.no_grad():
        for piece in [*g.segments, g.head]:
            piece.run(env)
        ref = gm(*example)
    got = [env[o] for o in g.outputs]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_layers_without_a_stack_are_left_dense(dyncompile_log):
    entry = ZOO["encoder-layer-bf"]
    _, g, _ = _plan(entry.build().eval(), entry.inputs(2, 6))
    assert isinstance(g, str) and "layer" in g


def _optimized(model, cal, **kw):
    return dyncompile.optimize(model, methods=["early_exit"], calibration=cal,
                               compiler=kw.pop("compiler", "eager"), **kw)


def test_encoder_budget_one_is_dense_and_compute_falls_with_budget():
    model = _bert()
    opt = _optimized(model, [_ids(8, 8, s) for s in range(4)])
    x = _ids(6, 8, seed=9)
    assert assert_matches_dense(model, opt, x, atol=1e-5) <= 1e-5
    spent, depth = [], []
    with torch.no_grad():
        for b in (1.0, 0.8, 0.6, 0.4, 0.3):
            opt.budget = b
            opt(**x)
            spent.append(opt.stats.fraction)
            depth.append(opt.stats.ratio("exit_depth") or 1.0)
    assert spent[0] == 1.0 and spent[-1] < 0.6
    assert all(a >= b - 1e-6 for a, b in zip(spent, spent[1:]))  # monotone
    assert depth[-1] < 0.6


def test_rows_leave_the_batch_independently():
    """With compaction every row gets what it would get alone at the same budget."""
    model = _bert()
    opt = _optimized(model, [_ids(8, 8, s) for s in range(4)])
    x = _ids(5, 8, seed=3)
    with torch.no_grad(), dyncompile.budget(0.5):
        together = opt(**x)
        assert 0.0 < opt.stats.ratio("exit_depth") < 1.0   # some rows left early
        alone = [opt(**{k: v[i:i + 1] for k, v in x.items()}) for i in range(5)]
    for i, one in enumerate(alone):
        for a, b in zip(together.to_tuple(), one.to_tuple()):
            torch.testing.assert_close(a[i:i + 1], b, atol=1e-5, rtol=1e-5)


def test_calibration_maps_and_threshold_curve():
    x = torch.tensor([0.1, 0.3, 0.2, 0.5])
    fitted = isotonic(x, torch.ones(4))
    assert torch.all(fitted[1:] >= fitted[:-1]) and abs(float(fitted.sum()) - 1.1) < 1e-6
    g = torch.Generator().manual_seed(0)
    sig = torch.rand(2000, generator=g)
    target = (torch.rand(2000, generator=g) < sig).float()  # quality rises with the signal
    m = QualityMap.fit(sig, target)
    assert torch.all(m.values[1:] >= m.values[:-1])
    assert float(m(torch.tensor([0.95]))) > 0.8 > 0.2 > float(m(torch.tensor([0.05])))
    quality = torch.rand(500, 3, generator=g)
    assert exit_layers(torch.tensor([[0.1, 0.9, 0.95], [0.1, 0.2, 0.3]]), 0.5).tolist() == [2, 4]
    cost = torch.tensor([0.3, 0.55, 0.8, 1.05])
    curve = ThresholdCurve.fit(quality, cost)
    assert torch.all(curve.fractions[1:] >= curve.fractions[:-1])
    for b in (0.4, 0.6, 0.9):
        assert abs(curve.fraction(b) - b) < 0.05
    assert curve.fraction(0.1) == pytest.approx(0.3)


def test_affine_adapter_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    w, b = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    fw, fb = fit_affine(x, x @ w.T + b)
    torch.testing.assert_close(fw, w, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fb, b, atol=1e-2, rtol=1e-2)


def _generate_at_one_and_low(opt, model, ids, new_tokens):
    """Greedy generate(): budget 1.0 must equal dense; returns (dense, budget-0.3) tokens."""
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with dyncompile.budget(1.0):
            assert torch.equal(opt.generate(ids, **kw), ref)
        with dyncompile.budget(0.3):
            out = opt.generate(ids, **kw)
    assert out.shape == ref.shape
    return kw, ref, out


def test_decoder_generate_budget_one_equal_and_rows_exit_with_filled_cache():
    model = _llama()
    opt = _optimized(model, [_ids(4, 16, s) for s in range(3)])
    ids = _ids(3, 6, seed=5)["input_ids"]
    kw, _, out = _generate_at_one_and_low(opt, model, ids, 6)
    assert opt.stats.fraction < 0.9
    with torch.no_grad(), dyncompile.budget(0.3):
        # Each sequence decodes as it would alone: rows leave independently and the
        # cache entries of skipped layers are filled for them.
        for i in range(3):
            one = opt.generate(ids[i:i + 1], **{**kw, "attention_mask": kw[
                "attention_mask"][i:i + 1]})
            assert torch.equal(one[0], out[i])


def test_causal_lm_forward_freezes_tokens():
    model = _llama()
    opt = _optimized(model, [_ids(4, 16, s) for s in range(3)])
    x = {"input_ids": _ids(2, 12, seed=7)["input_ids"]}
    with torch.no_grad():
        dense = model(**x).logits
        with dyncompile.budget(0.4):
            out = opt(**x).logits
        depth = opt.stats.ratio("exit_depth")
    assert depth is not None and depth < 0.9
    assert not torch.allclose(out, dense)
    # Token 0 attends to nothing else: its logits are the dense ones unless it exited.
    assert out.shape == dense.shape


def test_no_recompile_across_budgets_under_inductor():
    model = _bert()
    opt = _optimized(model, [_ids(8, 8, s) for s in range(2)], compiler="inductor")
    x = _ids(6, 8, seed=1)
    with torch.no_grad():
        for b in (1.0, 0.5):           # warm: every piece compiled for the sizes it sees
            with dyncompile.budget(b):
                opt(**x)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        outs = {}
        for b in (0.3, 0.5, 0.7, 1.0, 0.5):
            with dyncompile.budget(b):
                outs[b] = opt(**x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
        # Rows left, so pieces ran on fewer rows than they were traced with: one compiled
        # graph per piece serves every batch size.
        with dyncompile.budget(0.3):
            opt(**_ids(9, 8, seed=4))
            assert opt.stats.ratio("exit_depth") < 1.0
    graphs = opt.state.forms["early_exit"].graphs
    # Every segment, the head, the whole graph (run when no exit can fire), and each
    # segment fused with the exit check after it (MiniLM-like: the token mean).
    assert graphs and all(g.compiled and g.checks_mode == "mean" and
                          g.graphs == len(g.segments) + 2 + g.exits for g in graphs)
    # Pieces that ran without grad checked out against their wrappers and now call the
    # generated code directly.
    ran = [p.fn for g in graphs for p in [*g.segments, g.whole, *g.checks]
           if getattr(p.fn, "checked", None) is not None]
    assert ran and all(fn.direct for fn in ran)
    # With rows leaving (pieces on fewer rows), the direct calls give what the wrapped
    # ones give.
    y = _ids(9, 8, seed=4)
    with torch.no_grad(), dyncompile.budget(0.3):
        direct = opt(**y)
        for fn in ran:
            fn.checked = False
        opt.state.forms["early_exit"]._fast.clear()  # straight lines bound the direct calls
        wrapped = opt(**y)
    compare_outputs(direct, wrapped, atol=0.0, rtol=0.0)
    assert opt.stats.ratio("exit_depth") < 1.0
    compare_outputs(outs[1.0], call_batch(model, x), atol=1e-4)
    # Pieces whose inputs are all row-major (or parameters) were compiled without
    # Inductor's per-call input checks; the rows that stayed, selected out of the batch,
    # still get what each gets alone.
    pieces = [(p, fn) for g in graphs for p in [*g.segments, g.head, g.whole, *g.checks]
              for fn in [p.fn] if getattr(fn, "inner", None) is not None]
    lean = [fn for p, fn in pieces if fixed_layouts(p.inputs)]
    assert lean and all(_size_asserts(fn) == 0 for fn in lean)
    assert all(_size_asserts(fn) > 0 for p, fn in pieces if not fixed_layouts(p.inputs))
    with torch.no_grad(), dyncompile.budget(0.3):
        for i in (0, 5):
            alone = opt(**{k: v[i:i + 1] for k, v in y.items()})
            for a, b in zip(direct.to_tuple(), alone.to_tuple()):
                torch.testing.assert_close(a[i:i + 1], b, atol=1e-5, rtol=1e-5)


def _size_asserts(fn) -> int:
    """How many input checks the generated code of a compiled piece makes per call."""
    import inspect

    with open(inspect.getsourcefile(fn.inner)) as f:
        return f.read().count("assert_size_stride(")


def test_row_major_layouts_with_symbolic_sizes():
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    assert row_major(torch.empty(3, 4, 5))
    assert row_major(torch.empty(1, 4, 5).as_strided((1, 4, 5), (999, 5, 1)))  # size-1 dim
    assert not row_major(torch.empty(4, 3).t())
    assert not row_major(torch.empty(4, 1).expand(4, 6))
    assert not row_major(torch.empty(4, 8)[:, :6])               # a padded row
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3)
    y, wide = (mode.from_tensor(torch.empty(3, 7, w), source=ConstantSource(f"x{w}"),
                                symbolic_context=dynamic) for w in (8, 16))
    assert all(isinstance(d, torch.SymInt) for d in y.shape)     # every size a symbol
    with mode:
        assert row_major(y)
        assert not row_major(y.transpose(0, 1))
        assert not row_major(wide[..., :8])


def test_save_and_load_restore_the_same_exits(tmp_path):
    model = _bert()
    opt = _optimized(model, [_ids(8, 8, s) for s in range(3)])
    x = _ids(4, 8, seed=2)
    with torch.no_grad(), dyncompile.budget(0.5):
        before = opt(**x)
        opt.save(tmp_path / "ee")
        loaded = dyncompile.load(_bert(), tmp_path / "ee", compiler="eager")
        after = loaded(**x)
    compare_outputs(after, before, atol=1e-6)


def test_runtime_places_what_the_hot_path_reads_on_the_stream_device():
    """Fits stay on the CPU; adapters, cuts and the never-cut follow ``device`` (here
    "meta", a device no CPU tensor can stand in for); exports come back to the CPU."""
    opt = _optimized(_bert(), [_ids(8, 8, s) for s in range(3)])
    rt = opt.state.forms["early_exit"]
    assert rt.device == torch.device("cpu") and rt.adapters
    assert all(m.centers.device.type == "cpu" for m in rt.maps)
    width = rt.adapters[0]["w"].shape[0]
    tensors, meta = rt.export()
    rt.device = torch.device("meta")
    rt._place()
    assert all(t.device.type == "meta" for a in rt.adapters for t in a.values())
    assert all(t.device.type == "meta" for t in rt.adapter_args(1, width, torch.float32))
    assert rt.cut(1, 0.9).device.type == "meta" and rt.never.device.type == "meta"
    # Restoring onto a model follows the model's parameters; exports are CPU tensors.
    rt.restore(tensors, meta, _bert())
    assert rt.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in rt.export()[0].values())
    rt.restore(tensors, meta, _bert().to("meta"))
    assert rt.device.type == "meta"
    assert all(t.device.type == "meta" for a in rt.adapters for t in a.values())


def test_backend_calibrates_on_first_inputs(dyncompile_log):
    model = _bert()
    compiled = torch.compile(model, backend="dyn",
                             options={"methods": ["early_exit"], "compiler": "eager"})
    x = _ids(4, 8)
    with torch.no_grad():
        dense = compiled(**x).last_hidden_state
        with dyncompile.budget(0.3):
            early = compiled(**x).last_hidden_state
    assert any("calibrating on the first inputs" in m for m in dyncompile_log)
    torch.testing.assert_close(dense, model(**x).last_hidden_state)
    assert not torch.allclose(early, dense)


def test_decoder_generate_under_inductor():
    """Compiled pieces see rows selected from strided cache tensors (layout kept)."""
    model = _llama()
    opt = _optimized(model, [_ids(4, 16, s) for s in range(2)], compiler="inductor")
    _generate_at_one_and_low(opt, model, _ids(2, 6, seed=5)["input_ids"], 4)
    assert opt.stats.ratio("exit_depth") < 1.0


@pytest.mark.parametrize("option,value", [
    ("adapter", "none"), ("adapter_rank", 32), ("signal_from", "raw"), ("tune_steps", 30),
    ("adapter_fit", "tokens"), ("adapter_fold", "none")])
def test_removed_options_are_rejected(option, value):
    """The form takes no options: the settings that lost their ablations are gone."""
    with pytest.raises(ValueError, match=f"unknown early_exit option '{option}'"):
        dyncompile.DynConfig(methods=("early_exit",),
                             form_options={"early_exit": {option: value}})
