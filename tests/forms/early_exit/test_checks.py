"""Exit checks fused into the layer pieces: the fused graph is the segment plus the check
(ops counted), runs give the same exits and outputs as the unfused checks, and the
signal cut agrees with the quality map."""

import pytest
import torch
import transformers

import dyncompile
from dyncompile.forms.early_exit.checks import build_check
from dyncompile.forms.early_exit.fit import QualityMap
from dyncompile.ops.token_mean.cpu import kernel_available as token_mean_available
from tests.forms.early_exit.test_early_exit import SMALL, _bert, _ids, _plan, _size_asserts
from tests.forms.early_exit.test_pooling import PooledClassifier, _cal, _masked, _ops


def _body(gm):
    return _ops([n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")])


def _added(c):
    extra = _body(c.module)
    for op in _ops(c.segment.nodes):
        extra.remove(op)  # raises if the fused graph lost one of the segment's ops
    return extra


def test_mean_check_fused_graph_is_segment_plus_token_mean_adapter_and_cosine():
    gm, g, _ = _plan(_bert(), _ids(2, 6, 0))
    assert g.checks_mode == "mean" and len(g.checks) == g.exits == 3
    first, second = g.checks[0], g.checks[1]
    # Exit 1: the adapted token mean of the state, compared with the exit-0 state's mean
    # (segment 0 makes both, so there is no ``prev`` input).
    assert not first.takes_prev
    decide = ["ge", "any"]  # which rows reach the cut, and whether any does
    # The exit-0 mean: the serial token_mean kernel on the CPU where it builds.
    ref = ["token_mean"] if token_mean_available() else ["flatten", "float", "mean"]
    assert _added(first) == sorted([*ref, "flatten", "float", "mean", "float", "linear",
                                    "add", "cosine_similarity", *decide])
    # Later exits read the previous exit's summary instead.
    assert second.takes_prev and first.segment is g.segments[0]
    assert _added(second) == sorted(["flatten", "float", "mean", "float", "linear", "add",
                                     "cosine_similarity", *decide])
    names = [n.name for n in second.module.graph.nodes if n.op == "placeholder"]
    assert names[-4:] == ["adapter_w", "adapter_b", "cut", "prev"]
    assert len(names) == len(second.inputs) + 4


def test_pooled_check_fused_graph_pools_adapts_and_runs_the_head():
    gm, g, _ = _plan(PooledClassifier("mean").eval(), _masked(2, 6, 0))
    assert g.checks_mode == "pooled"
    c = g.checks[1]
    pool, post = _ops(g.pool.nodes), _ops(g.post.nodes)
    expected = sorted([*pool, *pool,                      # the state, and an all-ones one
                       "ones_like", "linear", "mul", "add",  # adapter, bias scaled
                       *post,                             # the rest of the head
                       "float", "softmax", "max", "getitem", "getitem",  # confidence
                       "ne", "float", "sub",              # less one where it changed
                       "ge", "any"])                      # the rows that leave
    assert _added(c) == expected
    assert c.heads == g.post.outputs and c.takes_prev


def _bert_classifier():
    """HF's BERT classifier: the head reads the first token through a linear (the pooler)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**SMALL, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_pooled_check_folds_the_adapter_into_the_heads_first_linear():
    model = _bert_classifier()
    gm, g, _ = _plan(model, _masked(2, 6, 0))
    assert g.checks_mode == "pooled" and g.signal == "confidence"
    pooler = model.bert.pooler.dense.weight
    for c in g.checks:
        assert c.fold is pooler
        assert c.adapter_shapes(g.width) == [(pooler.shape[0], g.width), (pooler.shape[0],)]
    c = g.checks[1]
    plain = build_check(2, g.segments[1], g.stream, g.signal, "pooled", g.primary, g.pool,
                        g.post)
    assert plain.fold is None
    # The folded check: the same ops, but the adapter and the pooler's linear are one
    # product (the bias scale read as one column, the pooler's bias added on its own).
    before, after = _added(plain), _added(c)
    assert before.count("linear") == after.count("linear") + 1 == 3
    before.remove("linear")  # the adapter's product
    after.remove("getitem")  # the scale's first column
    after.remove("add")      # the pooler's own bias
    assert after == before
    # The pooler's weight is no longer an input of the check.
    assert [n for n in plain.inputs if n not in c.inputs] == [_head_weight(g)]


def _head_weight(g):
    lin = next(u for u in g.pool.outputs[0].users)
    return lin.args[1] if len(lin.args) > 1 else lin.kwargs["weight"]


def _run(opt, x, fused: bool):
    rt = opt.state.forms["early_exit"]
    saved = [(g, g.checks) for g in rt.graphs]
    if not fused:
        for g in rt.graphs:
            g.checks = None
    try:
        out = {}
        with torch.no_grad():
            for b in (0.3, 0.5, 0.8):
                with dyncompile.budget(b):
                    y = opt(**x)
                if not isinstance(y, torch.Tensor):
                    y = y.logits if hasattr(y, "logits") else y.last_hidden_state
                out[b] = (y, opt.stats.fraction, opt.stats.ratio("exit_depth") or 1.0)
        return out
    finally:
        for g, checks in saved:
            g.checks = checks


@pytest.mark.parametrize("which", ["mean", "pooled", "folded"])
def test_fused_checks_give_the_same_exits_and_outputs(which):
    if which == "mean":
        model, cal, x = _bert(), [_ids(8, 8, s) for s in range(4)], _ids(9, 8, 5)
    elif which == "pooled":
        model, cal, x = PooledClassifier("mean").eval(), _cal(), _masked(9, 8, 5)
    else:
        model, cal, x = _bert_classifier(), _cal(), _masked(9, 8, 5)
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=cal,
                              compiler="eager")
    rt = opt.state.forms["early_exit"]
    assert all(g.checks_mode == ("pooled" if which == "folded" else which)
               for g in rt.graphs)
    checks = [c for g in rt.graphs for c in g.checks]
    assert all((c.fold is not None) == (which == "folded") for c in checks)
    calls = []
    original = [g.checks for g in rt.graphs]
    for checks in original:
        for c in checks:
            fn = c.fn
            c.fn = lambda *a, fn=fn: calls.append(1) or fn(*a)
    fused, plain = _run(opt, x, True), _run(opt, x, False)
    assert calls, "the fused checks did not run"
    depths = []
    for b in fused:
        torch.testing.assert_close(fused[b][0], plain[b][0], atol=1e-5, rtol=1e-5)
        assert fused[b][1:] == pytest.approx(plain[b][1:], rel=1e-6)
        depths.append(fused[b][2])
    assert min(depths) < 1.0  # rows left somewhere: the leaving path ran fused


def test_signal_cut_agrees_with_the_quality_map():
    gen = torch.Generator().manual_seed(0)
    signal = torch.rand(500, generator=gen)
    target = (signal + 0.3 * torch.randn(500, generator=gen) > 0.5).float()
    m = QualityMap.fit(signal, target)
    probe = torch.linspace(-0.5, 1.5, 2001)
    q = m(probe)
    for t in [float(v) for v in torch.linspace(0.0, 1.05, 23)]:
        cut = m.cut(t)
        agree = (q >= t) == (probe >= cut)
        # Only a probe within rounding of the cut may disagree.
        assert bool(agree.all()) or bool(((probe - cut).abs()[~agree] < 1e-5).all())
    assert m.cut(float(m.values.min()) - 1) == float("-inf")
    assert m.cut(float(m.values.max()) + 1e-3) == float("inf")


def test_folded_checks_and_the_pooled_head_under_inductor():
    """HF's BERT classifier compiled by Inductor: the head's pooled value is the first
    token's row, a view of the stream when traced, but the post piece also reads adapted
    rows (new tensors), so it is compiled for row-major ones."""
    model = _bert_classifier()
    # Calibration rows of several lengths: the sequence length is a symbol, which the
    # first token's row of the stream keeps only in its strides.
    cal = [_masked(8, 6 + 2 * s, s) for s in range(4)]
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=cal)
    rt = opt.state.forms["early_exit"]
    x = _masked(9, 8, 5)
    with torch.no_grad(), dyncompile.budget(1.0):
        torch.testing.assert_close(opt(**x).logits, model(**x).logits, atol=1e-4, rtol=1e-4)
    assert all(g.compiled and g.checks_mode == "pooled" and all(c.fold is not None
                                                                for c in g.checks)
               for g in rt.graphs)
    fused, plain = _run(opt, x, True), _run(opt, x, False)
    for b in fused:
        torch.testing.assert_close(fused[b][0], plain[b][0], atol=1e-5, rtol=1e-5)
        assert fused[b][1:] == pytest.approx(plain[b][1:], rel=1e-6)
    assert min(f[2] for f in fused.values()) < 1.0  # rows left: the post piece ran on them
    posts = [g.post.fn for g in rt.graphs if getattr(g.post.fn, "inner", None) is not None]
    assert posts and all(_size_asserts(fn) == 0 for fn in posts)
    # One row alone (a graph for batch 1, where that row counts as contiguous whatever
    # its strides) gets what it got in the batch.
    with torch.no_grad(), dyncompile.budget(0.3):
        for i in (0, 1):
            alone = opt(**{k: v[i:i + 1] for k, v in x.items()}).logits
            torch.testing.assert_close(alone, fused[0.3][0][i:i + 1], atol=1e-5, rtol=1e-5)
