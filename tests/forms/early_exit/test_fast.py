"""The straight-line path of an early-exit call (``forms/early_exit/fast.py``): it gives what the
generic row loop gives (outputs, spent compute, depth), when no row leaves and when rows
leave at some exit and the loop resumes there; its generated code calls each piece once."""


import pytest
import torch

import dyncompile
from dyncompile.forms.early_exit import program as exit_program
from tests.forms.early_exit.test_early_exit import _bert, _ids
from tests.forms.early_exit.test_pooling import PooledClassifier, _cal, _masked


def _optimized(which):
    if which == "mean":
        model, cal, x = _bert(), [_ids(8, 8, s) for s in range(4)], _ids(9, 8, 5)
    else:
        model, cal, x = PooledClassifier("mean").eval(), _cal(), _masked(9, 8, 5)
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=cal,
                              compiler="eager")
    return opt, x


class _Count:
    """Counts the runner's entries: straight line, generic loop, and resumptions."""

    def __init__(self, monkeypatch, generic_only=False):
        self.fast = self.generic = self.resumed = 0
        rows, fast = exit_program.ExitRunner._rows_mode, exit_program.ExitRunner._fast_path

        def rows_mode(runner, env, threshold, started=False, resume=None):
            if resume is None:
                self.generic += 1
            else:
                self.resumed += 1
            return rows(runner, env, threshold, started, resume)

        def fast_path(runner, threshold):
            got = None if generic_only else fast(runner, threshold)
            self.fast += got is not None
            return got

        monkeypatch.setattr(exit_program.ExitRunner, "_rows_mode", rows_mode)
        monkeypatch.setattr(exit_program.ExitRunner, "_fast_path", fast_path)


def _calls(opt, x, budgets):
    out = {}
    with torch.no_grad():
        for b in budgets:
            with dyncompile.budget(b):
                y = opt(**x)
            out[b] = (y if isinstance(y, torch.Tensor) else y.last_hidden_state,
                      opt.stats.fraction, opt.stats.ratio("exit_depth") or 1.0)
    return out


@pytest.mark.parametrize("which", ["mean", "pooled"])
def test_straight_line_equals_the_generic_loop_and_resumes_where_rows_leave(which,
                                                                            monkeypatch):
    opt, x = _optimized(which)
    budgets = (0.3, 0.5, 0.8)
    with monkeypatch.context() as m:
        generic = _Count(m, generic_only=True)
        plain = _calls(opt, x, budgets)
    # (a budget at which no exit can fire runs the whole graph, in neither loop)
    assert generic.fast == generic.resumed == 0 and generic.generic >= 2
    count = _Count(monkeypatch)
    fast = _calls(opt, x, budgets)
    assert count.fast == generic.generic and count.generic == 0
    assert count.resumed >= 1  # rows left at some exit: the generic loop took over there
    depths = []
    for b in budgets:
        torch.testing.assert_close(fast[b][0], plain[b][0], atol=0.0, rtol=0.0)
        assert fast[b][1:] == pytest.approx(plain[b][1:], rel=1e-9)
        depths.append(fast[b][2])
    assert min(depths) < 1.0


def test_straight_line_when_no_row_leaves(monkeypatch):
    """Every exit checked, no cut reachable: the straight line runs every layer and
    accounts for every check, as the generic loop does."""
    opt, x = _optimized("mean")
    rt = opt.state.forms["early_exit"]
    monkeypatch.setattr(rt, "plan", lambda t, k: ([True] * k, [True] * k))
    monkeypatch.setattr(rt, "cut", lambda k, t: torch.tensor(float("inf")))
    with monkeypatch.context() as m:
        _Count(m, generic_only=True)
        plain = _calls(opt, x, (0.5,))[0.5]
    rt._fast.clear()
    count = _Count(monkeypatch)
    fast = _calls(opt, x, (0.5,))[0.5]
    assert count.fast == 1 and count.generic == count.resumed == 0
    torch.testing.assert_close(fast[0], plain[0], atol=0.0, rtol=0.0)
    assert fast[1] == pytest.approx(plain[1], rel=1e-9) and fast[1] > 1.0  # checks cost
    assert fast[2] == plain[2] == 1.0
    # The straight line calls each layer's piece once: every exit's fused check, then the
    # last layer and the head; each check can bail out.
    graph = rt.graphs[0]
    (path, *_), = [v for v in rt._fast.values() if v is not None]
    assert path.labels == [f"C{k}" for k in range(1, graph.exits + 1)] + ["S_last", "H"]
    assert sorted(path.bail_nodes) == list(range(1, graph.exits + 1))
