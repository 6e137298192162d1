"""optimize() and load() leave the model they were given as it was, unless inplace=True."""

import pytest
import torch

import dyncompile
from dyncompile.testing import assert_matches_dense
from dyncompile.testing.zoo import ZOO


def _snapshot(model):
    return {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}


def _same(model, snap):
    now = model.state_dict()
    assert sorted(now) == sorted(snap)
    for k, (v, stride) in snap.items():
        assert torch.equal(now[k], v), k
        assert now[k].stride() == stride, k


def _optimize(model, entry, methods, **kw):
    cal = [entry.inputs(4, 8) for _ in range(2)]
    opts = {"expert": {"experts": 4, "router_steps": 30}} if "expert" in methods else {}
    return dyncompile.optimize(model, methods=methods, calibration=cal, compiler="eager",
                               form_options=opts, **kw)


@pytest.mark.parametrize("methods", [["expert"], ["gated"]])
def test_the_model_given_is_left_as_it_was(methods):
    entry = ZOO["llama"]
    model = entry.build()
    before = _snapshot(model)
    x = entry.inputs(2, 8)
    opt = _optimize(model, entry, methods)
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(**x)
        opt(**x)                               # after the first call: layout changes
    assert opt.model is not model
    _same(model, before)
    # ...and the copy really was changed (permuted rows or input-major weights)
    changed = [k for k, v in opt.model.state_dict().items()
               if not torch.equal(v, before[k][0]) or v.stride() != before[k][1]]
    assert changed
    assert assert_matches_dense(model, opt, x, atol=1e-5) < 1e-5


def test_optimizing_the_same_model_twice_gives_two_correct_models():
    entry = ZOO["llama"]
    model = entry.build()
    x = entry.inputs(2, 8)
    a = _optimize(model, entry, ["expert"])
    b = _optimize(model, entry, ["expert"])
    for opt in (a, b):
        assert assert_matches_dense(model, opt, x, atol=1e-5) < 1e-5
    with torch.no_grad(), dyncompile.budget(0.5):
        torch.testing.assert_close(a(**x).logits, b(**x).logits, atol=1e-5, rtol=1e-5)


def test_inplace_lets_the_forms_change_the_model():
    entry = ZOO["llama"]
    model = entry.build()
    before = _snapshot(model)
    opt = _optimize(model, entry, ["expert"], inplace=True)
    assert opt.model is model
    assert any(not torch.equal(v, before[k][0]) for k, v in model.state_dict().items())


def test_forms_that_keep_the_weights_need_no_copy():
    entry = ZOO["mlp"]
    model = entry.build()
    opt = dyncompile.optimize(model, methods=["early_exit"], compiler="eager")
    assert opt.model is model
