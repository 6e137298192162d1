"""Many optimized models of one class in one process: every call of every model runs its
compiled graphs with the forms applied; a call that runs eager warns visibly."""

import warnings

import pytest
import torch

import dyncompile
from dyncompile.testing.zoo import ZOO


def test_twelve_models_of_one_class_each_run_compiled():
    entry = ZOO["mlp"]
    x = entry.inputs(2, 3)
    limit = torch._dynamo.config.recompile_limit
    models = [dyncompile.optimize(entry.build(), methods=["gated"], compiler="eager",
                                  calibration=[x]) for _ in range(limit + 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no eager fallback anywhere
        for opt in models:
            with torch.no_grad(), dyncompile.budget(0.5):
                opt(*x)
            assert opt.stats.graphs == 1
            assert opt.stats.ratio("active_channels") < 0.9   # the form ran in this call
            assert len(opt.report().rewritten["gated"]) == 2


def test_a_call_that_runs_eager_warns_once():
    entry = ZOO["mlp"]
    model = entry.build()
    opt = dyncompile.optimize(model, compiler="eager")
    object.__setattr__(opt, "_compiled", model)          # as if dynamo had fallen back
    opt._traced = True
    with pytest.warns(RuntimeWarning, match="ran no compiled graph"):
        opt(*entry.inputs(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt(*entry.inputs(1, 3))                          # once only
