"""Regression tests on traced HF models, written with dyncompile.testing as users would."""

import pytest

import dyncompile
from dyncompile.testing import assert_matches_dense, assert_no_recompile
from dyncompile.testing.zoo import ZOO

HF = ["gpt2", "llama", "qwen2", "mistral", "bert", "roberta", "distilbert", "t5", "vit"]


@pytest.mark.parametrize("name,methods", [*((n, []) for n in HF),
                                          *((n, None) for n in ("gpt2", "llama", "bert"))])
def test_hf_model_matches_dense_without_recompiles(name, methods):
    """No form, and (methods=None) every form planned on the first call's inputs."""
    entry = ZOO[name]
    model = entry.build()
    inputs = entry.inputs(2, 8)
    opt = dyncompile.optimize(model, budget=0.7, methods=methods, compiler="eager")
    assert_matches_dense(model, opt, inputs, atol=1e-5)
    assert_no_recompile(opt, inputs)
    assert opt.stats.dense_flops > 0
