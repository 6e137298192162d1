"""Many optimized models of one class in one process: every call of every model runs its
compiled graphs with the forms applied (a call that runs eager warns: tests/core)."""

import warnings

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
