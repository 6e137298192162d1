"""Budget validation, the call-time knob, thread safety, no recompiles, stats."""

import math
import threading
import warnings

import pytest
import torch

import dyncompile
from dyncompile.core.budget import BudgetState, current_budget
from dyncompile.testing import assert_no_recompile
from dyncompile.testing.zoo import ZOO


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan, "half", True, [0.5]])
def test_bad_budget_names_the_range(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dyncompile.optimize(ZOO["mlp"].build(), budget=bad, compiler="eager")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dyncompile.budget(bad)


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="unknown method 'magic'; known methods"):
        dyncompile.optimize(ZOO["mlp"].build(), methods=["magic"])
    with pytest.raises(ValueError, match="unknown dyn option"):
        dyncompile.DynConfig.from_options({"budgett": 0.5})


def test_context_nests_and_restores():
    assert current_budget(0.9) == 0.9
    with dyncompile.budget(0.5):
        assert current_budget(0.9) == 0.5
        with dyncompile.budget(0.2):
            assert current_budget(0.9) == 0.2
        assert current_budget(0.9) == 0.5
    assert current_budget(0.9) == 0.9


def test_threads_see_their_own_budget():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(b):
        with dyncompile.budget(b):
            barrier.wait()
            seen[b] = current_budget(1.0)

    threads = [threading.Thread(target=worker, args=(b,)) for b in (0.3, 0.7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0.3: 0.3, 0.7: 0.7}


def test_state_value_follows_the_budget_in_force():
    state = BudgetState(0.8)
    assert state.sync() == pytest.approx(0.8)
    with dyncompile.budget(0.25):
        assert state.sync() == 0.25
    assert state.value == 0.25
    assert state.sync() == pytest.approx(0.8) and state.value == pytest.approx(0.8)


def test_budget_property_and_no_recompile():
    entry = ZOO["llama"]
    model = entry.build()
    opt = dyncompile.optimize(model, budget=0.6, methods=[], compiler="eager")
    assert opt.budget == pytest.approx(0.6)
    opt.budget = 0.4
    assert opt.budget == pytest.approx(0.4)
    with pytest.raises(ValueError):
        opt.budget = 2
    warm = assert_no_recompile(opt, entry.inputs(1, 6))
    assert warm == 1
    assert opt.state.value == pytest.approx(0.2)  # the last call's budget
    with torch.no_grad():
        opt(**entry.inputs(1, 6))
    assert opt.state.value == pytest.approx(0.4) and opt.stats.budget == pytest.approx(0.4)


def test_state_dict_holds_each_weight_once():
    model = ZOO["mlp"].build()
    opt = dyncompile.optimize(model, methods=[], compiler="eager")
    assert sorted(opt.state_dict()) == sorted(f"model.{k}" for k in model.state_dict())


def test_stats_report_dense_flops_of_the_call():
    entry = ZOO["mlp"]
    opt = dyncompile.optimize(entry.build(), methods=[], compiler="eager")
    with torch.no_grad():
        opt(*entry.inputs(2, 5))
    expected = 2 * 2 * 5 * (32 * 64 + 64 * 32)
    assert opt.stats.dense_flops == expected and opt.stats.fraction == 1.0
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(*entry.inputs(3, 4))   # new sizes: a new (or dynamic) graph, cost follows
    assert opt.stats.dense_flops == 2 * 3 * 4 * (32 * 64 + 64 * 32)
    assert opt.stats.budget == 0.5
    assert dyncompile.last_call() is opt.stats


def test_python_float_budget_would_recompile_and_the_helper_catches_it():
    """What the runtime design avoids: a budget read as a Python float recompiles."""
    from dyncompile.backend import dyn_backend

    model = ZOO["mlp"].build()

    class FloatBudget(torch.nn.Module):
        def forward(self, x):
            return model(x) * current_budget(1.0)

    compiled = torch.compile(FloatBudget(), backend=dyn_backend, options={"compiler": "eager"})
    with pytest.raises(AssertionError, match="recompiled"):
        assert_no_recompile(compiled, (torch.randn(1, 3, 32),))


def test_warns_when_dynamo_falls_back_to_eager():
    entry = ZOO["mlp"]
    opt = dyncompile.optimize(entry.build(), methods=[], compiler="eager")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        opt(*entry.inputs(2, 5))
        with pytest.warns(RuntimeWarning, match="ran no compiled graph"):
            opt(torch.randn(10, 32))  # new rank: a recompile, over the limit
        assert opt.stats.graphs == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            opt(torch.randn(10, 32))  # once per model
