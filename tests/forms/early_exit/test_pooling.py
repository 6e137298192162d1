"""Pooled exits: the head's pooling region found on the graph (ops counted), checked on
real values, exits adapted after pooling (equal to adapting every token), adapters
refitted on pooled rows, and what a check costs."""

import pytest
import torch
import transformers
from torch import nn

import dyncompile
from dyncompile.forms.early_exit.program import ExitRunner
from dyncompile.forms.early_exit.rewrite import fit_pooled
from dyncompile.passes.pooling import find_pooling
from dyncompile.testing import assert_matches_dense
from tests.forms.early_exit.test_early_exit import SMALL, _ids, _plan

CLASSES = 5


class PooledClassifier(nn.Module):
    """Encoder + a head that pools first: mean over the mask (or the first token, or a
    channel permutation before the mean, which pooling must not be moved past)."""

    def __init__(self, pool: str = "mean") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
        self.head = nn.Linear(SMALL["hidden_size"], CLASSES)
        self.pool = pool
        self.register_buffer("perm", torch.randperm(SMALL["hidden_size"]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pool == "first":
            pooled = h[:, 0]
        elif self.pool == "square":
            pooled = (h * h).mean(1)
        else:
            if self.pool == "permuted":
                h = h[..., self.perm]
            mask = attention_mask.unsqueeze(-1).expand(h.size()).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(nn.functional.normalize(pooled, dim=-1))


def _masked(batch, seq, seed):
    x = _ids(batch, seq, seed)
    x["attention_mask"][1::2, seq // 2:] = 0  # padded rows
    return x


def _cal():
    return [_masked(8, 8, s) for s in range(4)]


def _ops(nodes):
    names = []
    for n in nodes:
        t = n.target
        names.append(t if isinstance(t, str) else getattr(t, "__name__", str(t)))
    return sorted(names)


def test_mean_pooling_region_found_and_head_cut_there():
    gm, g, _ = _plan(PooledClassifier("mean").eval(), _masked(2, 6, 0))
    assert not isinstance(g, str), g
    # Before: one head piece reading the stream per token (plus the encoder's unused
    # pooler). After: the pooling region, then a post piece on one row per sample.
    assert g.pool is not None and g.post is not None
    assert len(g.pool.outputs) == 1 and g.pool.outputs[0] in g.post.inputs
    assert g.stream[-1] in g.pool.inputs and g.stream[-1] not in g.post.inputs
    pool_ops = _ops(g.pool.nodes)
    assert pool_ops.count("mul") == 1 and pool_ops.count("sum") == 2
    assert pool_ops.count("truediv") == 1 and "linear" not in pool_ops
    assert _ops(g.post.nodes) == ["linear", "normalize"]
    width = SMALL["hidden_size"]
    # Costs count live nodes only: the pooler's linear is dead in this graph.
    assert g.head_cost == g.post_cost == 2 * width * CLASSES
    assert sum(1 for n in g.head.nodes if "linear" in str(n.target)) == 2


def test_first_token_pooling_found():
    _, g, _ = _plan(PooledClassifier("first").eval(), _masked(2, 6, 0))
    assert g.pool is not None and _ops(g.pool.nodes) == ["getitem"]


@pytest.mark.parametrize("name", ["square", "llama", "bert"])
def test_no_pooling_region_when_the_head_reads_the_stream_otherwise(name):
    from dyncompile.testing.zoo import ZOO
    if name == "square":
        model, x = PooledClassifier("square").eval(), _masked(2, 6, 0)
    else:  # per-token LM head; an encoder that returns the stream itself
        model, x = ZOO[name].build().eval(), ZOO[name].inputs(2, 6)
    _, g, _ = _plan(model, x)
    assert not isinstance(g, str) and g.pool is None and g.post is None


def test_find_pooling_needs_the_stream():
    _, g, _ = _plan(PooledClassifier("mean").eval(), _masked(2, 6, 0))
    assert find_pooling(g.head.nodes, g.stream[-1], [g.stream[-1]]) is None


def test_channel_mixing_region_is_rejected_on_real_values():
    model = PooledClassifier("permuted").eval()
    _, g, _ = _plan(model, _masked(2, 6, 0))
    assert g.pool is not None  # the graph alone cannot tell
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=_cal(),
                              compiler="eager")
    rt = opt.state.forms["early_exit"]
    assert rt.pool_ok is False and not rt.pooled_adapters
    x = _masked(6, 8, 5)
    assert assert_matches_dense(model, opt, x, atol=1e-5) <= 1e-5
    with torch.no_grad(), dyncompile.budget(0.3):
        opt(**x)
    assert opt.stats.fraction < 0.9  # exits still work, per token


def test_pooled_refit_recovers_a_map_and_shrinks_to_the_token_fit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    ones = torch.ones(300, 6)
    w, b = torch.randn(6, 6, generator=g), torch.randn(6, generator=g)
    y = x @ w.T + b
    w0, b0 = torch.zeros(6, 6), torch.zeros(6)
    fw, fb = fit_pooled(x, ones, y, w0, b0, ridge=1e-6)
    torch.testing.assert_close(fw, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fb, b, atol=1e-3, rtol=1e-3)
    sw, _ = fit_pooled(x, ones, y, w0, b0, ridge=1e6)
    assert float(sw.abs().max()) < 1e-3  # all shrinkage: the token fit


def test_pooled_refit_used_saved_and_restored(tmp_path):
    model = PooledClassifier("mean").eval()
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=_cal(),
                              compiler="eager")
    rt = opt.state.forms["early_exit"]
    assert rt.pool_ok and len(rt.pooled_adapters) == len(rt.adapters) == rt.graphs[0].exits
    assert not torch.allclose(rt.pooled_adapters[0]["w"], rt.adapters[0]["w"])
    x = _masked(6, 8, 3)
    with torch.no_grad(), dyncompile.budget(0.4):
        before = opt(**x)
        assert opt.stats.fraction < 0.8
        opt.save(tmp_path / "ee")
        loaded = dyncompile.load(PooledClassifier("mean").eval(), tmp_path / "ee",
                                 compiler="eager")
        after = loaded(**x)
    lrt = loaded.state.forms["early_exit"]
    assert lrt.pool_ok and len(lrt.pooled_adapters) == len(rt.pooled_adapters)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def _spent_with_every_exit_checked(opt, x):
    rt = opt.state.forms["early_exit"]
    saved = rt.plan, rt.cut
    rt.plan = lambda t, k: ([True] * k, [True] * k)
    rt.cut = lambda k, t: torch.tensor(float("inf"))  # no signal reaches it
    try:
        with torch.no_grad(), dyncompile.budget(0.5):
            opt(**x)
    finally:
        rt.plan, rt.cut = saved
    return opt.stats.fraction


def test_pooled_checks_cost_little_when_no_row_leaves():
    model = PooledClassifier("mean").eval()
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=_cal(),
                              compiler="eager")
    x = _masked(6, 8, 7)
    pooled = _spent_with_every_exit_checked(opt, x)
    opt.state.forms["early_exit"].pool_ok = False  # the same exits, adapted per token
    per_token = _spent_with_every_exit_checked(opt, x)
    assert 1.0 < pooled < 1.03 < per_token


def test_stream_output_decides_on_the_token_mean(monkeypatch):
    """An encoder returning the stream: the convergence signal reads the token mean of
    the adapted state, which is the adapter applied to the token mean (one row)."""
    from tests.forms.early_exit.test_early_exit import _bert
    model = _bert()
    opt = dyncompile.optimize(model, methods=["early_exit"],
                              calibration=[_ids(8, 8, s) for s in range(3)], compiler="eager")
    rt = opt.state.forms["early_exit"]
    g = rt.graphs[0]
    runner = ExitRunner(g, rt, opt.state)
    assert runner.mode == "mean" and g.pool is None
    calls = []
    call = ExitRunner.__call__
    monkeypatch.setattr(ExitRunner, "__call__",
                        lambda self, *args: calls.append(args) or call(self, *args))
    x = _ids(4, 8, 12)
    with torch.no_grad():
        opt(**x)
        env = dict(zip(g.placeholders, calls[-1]))
        g.segments[0].run(env)
        raw = env[g.stream[1]]
        mean, heads = runner._decide_on(env, 1, raw, True)
        assert heads is None
        full = runner._exit_heads(env, 1, raw, True)[g.primary]
        torch.testing.assert_close(mean, full.mean(1), atol=1e-5, rtol=1e-4)
    spent = _spent_with_every_exit_checked(opt, x)
    assert 1.0 < spent < 1.03


def test_pooled_rows_leave_the_batch_independently():
    model = PooledClassifier("mean").eval()
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=_cal(),
                              compiler="eager")
    x = _masked(7, 8, 21)
    with torch.no_grad(), dyncompile.budget(0.5):
        together = opt(**x)
        assert 0.0 < opt.stats.ratio("exit_depth") < 1.0
        alone = torch.cat([opt(**{k: v[i:i + 1] for k, v in x.items()}) for i in range(7)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
