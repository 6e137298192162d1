"""Misuse gets a clear error or warning that names the problem."""

import warnings

import pytest
import torch

import dyncompile
from dyncompile.testing.zoo import ZOO


def test_empty_or_unusable_calibration_is_a_value_error():
    model = ZOO["mlp"].build()
    with pytest.raises(ValueError, match="calibration is empty"):
        dyncompile.optimize(model, methods=["gated"], calibration=[], compiler="eager")
    with pytest.raises(ValueError, match="calibration batch 1 is a str"):
        dyncompile.optimize(model, methods=["gated"], compiler="eager",
                            calibration=[ZOO["mlp"].inputs(2, 3), "text"])
    with pytest.raises(ValueError, match=r"wrap it as \[batch\]"):
        dyncompile.optimize(model, methods=["gated"], compiler="eager",
                            calibration=torch.randn(2, 3, 32))


def test_options_for_a_form_not_selected_are_a_value_error():
    model = ZOO["mlp"].build()
    with pytest.raises(ValueError, match="form_options names 'expert', not in methods"):
        dyncompile.optimize(model, methods=["gated"], compiler="eager",
                            form_options={"expert": {"experts": 4}})
    with pytest.raises(ValueError, match="not in methods"):
        dyncompile.DynConfig(form_options={"gated": {"glu": "cats"}})


def test_a_form_that_rewrites_nothing_warns_and_the_report_says_so():
    entry = ZOO["noblocks"]
    model = entry.build()
    opt = dyncompile.optimize(model, methods=["expert"], compiler="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            opt(*entry.inputs(2, 3))
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("form 'expert' rewrote nothing" in m and "FFN blocks" in m for m in msgs), msgs
    report = opt.report()
    assert report.rewritten == {"expert": []}
    assert "expert: nothing rewritten (looks for FFN blocks" in str(report)


def test_the_report_lists_what_each_form_rewrote():
    entry = ZOO["llama"]
    model = entry.build()
    opt = dyncompile.optimize(model, methods=["gated"], compiler="eager",
                              calibration=[entry.inputs(2, 6)])
    names = opt.report().rewritten["gated"]
    params = dict(model.named_parameters())
    linears = [n for n, p in params.items() if n.endswith(".weight") and p.dim() == 2
               and ".layers." in n and "norm" not in n]
    assert sorted(names) == sorted(linears)          # q, k, v, o, gate, up, down per layer
    assert str(opt.report()).startswith(f"gated: {len(linears)} rewritten: ")


def test_load_into_another_model_names_the_first_mismatch(tmp_path):
    entry = ZOO["llama"]
    cal = [entry.inputs(2, 6)]
    opt = dyncompile.optimize(entry.build(), methods=["gated"], compiler="eager",
                              calibration=cal)
    opt.save(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"parameter '.+', which Sequential does not have"):
        dyncompile.load(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "saved")
    wider = ZOO["gpt2"].build()
    with pytest.raises(ValueError, match="parameter"):
        dyncompile.load(wider, tmp_path / "saved")
    same = dyncompile.load(entry.build(), tmp_path / "saved")  # the right model still loads
    assert same.config.methods == ("gated",)
