"""A seeded fuzz of the public API: every call either raises one of the documented
exceptions with a message, or succeeds, and then budget 1.0 equals the dense model."""

import math
import random

import pytest
import torch

import dyncompile
from dyncompile.testing import assert_matches_dense
from dyncompile.testing.zoo import ZOO

DOCUMENTED = (ValueError, TypeError, dyncompile.TraceError)

GOOD_BUDGETS = [1.0, 0.5, 0.3, 0.01, 1, 0.999, None]
BAD_BUDGETS = [0, -0.2, 1.5, float("nan"), True, "0.5"]
GOOD_METHODS = [None, [], ["gated"], ["expert"], ["early_exit"], "gated", ["gated", "gated"],
                ["gated", "early_exit"]]
BAD_METHODS = [["nope"], [3], 5]
GOOD_OPTIONS = {"gated": [{}, {"glu": "cats"}, {"allocation": "greedy"}, {"layout": "as_is"}],
                "expert": [{"experts": 2, "router_steps": 5},
                           {"expert_size": 16, "router_steps": 5, "router_precision": "fp32"}],
                "early_exit": [{}]}
BAD_OPTIONS = [{"gated": {"glu": "x"}}, {"expert": {"experts": 0}}, {"expert": {"what": 1}},
               {"early_exit": {"adapter": "none"}}, {"nope": {}}, {"gated": "cats"}, "gated"]
MODELS = ["mlp", "llama", "bert", "gpt2"]


def _pick(rng, good, bad):
    return (rng.choice(bad), False) if rng.random() < 0.2 else (rng.choice(good), True)


def _case(rng):
    budget, _ = _pick(rng, GOOD_BUDGETS, BAD_BUDGETS)
    methods, _ = _pick(rng, GOOD_METHODS, BAD_METHODS)
    names = [methods] if isinstance(methods, str) else list(methods or []) \
        if isinstance(methods, (list, type(None))) else []
    good = {m: rng.choice(GOOD_OPTIONS[m]) for m in names if m in GOOD_OPTIONS}
    options, _ = _pick(rng, [good], BAD_OPTIONS)
    cal, _ = _pick(rng, ["none", "ok"], ["empty", "str"])
    return rng.choice(MODELS), budget, methods, options, cal, rng.choice([(1, 4), (2, 6)])


@pytest.mark.parametrize("seed", range(40))
def test_public_api_fuzz(seed):
    rng = random.Random(seed)
    name, budget, methods, options, cal, (b, s) = _case(rng)
    entry = ZOO[name]
    model = entry.build()
    x = entry.inputs(b, s)
    calibration = {"none": None, "ok": [entry.inputs(2, 6)], "empty": [],
                   "str": ["some text"]}[cal]
    try:
        opt = dyncompile.optimize(model, budget=budget, methods=methods,
                                  calibration=calibration, compiler="eager",
                                  form_options=options)
        with torch.no_grad(), dyncompile.budget(0.5):
            opt(**x) if isinstance(x, dict) else opt(*x)
    except DOCUMENTED as e:
        assert str(e), f"{type(e).__name__} without a message"
        return
    valid = budget is None or not isinstance(budget, bool) and isinstance(
        budget, (int, float)) and not math.isnan(budget) and 0 < budget <= 1  # None: 1.0
    assert valid, f"budget {budget!r} was accepted"
    assert assert_matches_dense(model, opt, x, atol=1e-4) < 1e-4
    for bad in (0, 2, float("nan"), "x"):
        with pytest.raises(ValueError, match="budget"):
            opt.budget = bad
