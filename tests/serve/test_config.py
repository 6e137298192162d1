"""``dyncompile.integrations.vllm.config``: what it hands vLLM (no vLLM needed)."""

import os

import pytest

from dyncompile.integrations import vllm as dynv


def test_config_names_the_backend_and_carries_the_options(monkeypatch):
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    cfg = dynv.config(budget=0.5, methods=["gated"], calibrate_first_tokens=256,
                      inductor={"max_autotune": False})
    assert cfg["mode"] == 2 and cfg["backend"] == dynv.BACKEND
    options = cfg["inductor_compile_config"].pop(dynv.OPTIONS_KEY)
    assert cfg["inductor_compile_config"] == {"max_autotune": False}
    assert options == {"budget": 0.5, "methods": ["gated"],
                       "form_options": {"gated": {"scope": "all"}},
                       "calibrate_first_tokens": 256}
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    # The backend's dotted name resolves to the worker's backend.
    module, name = dynv.BACKEND.rsplit(".", 1)
    import importlib

    assert callable(getattr(importlib.import_module(module), name))


def test_user_gated_options_win_over_the_default_scope():
    cfg = dynv.config(methods=["gated"], form_options={"gated": {"scope": "blocks"}})
    assert cfg["inductor_compile_config"]["dyncompile"]["form_options"] == {
        "gated": {"scope": "blocks"}}


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 0.0}, "budget"),
    ({"methods": ["early_exit"]}, "whole model"),
    ({"methods": ["nope"]}, "nope"),
    ({"form_options": {"gated": {"scope": "most"}}}, "scope"),
    ({"calibrate_first_tokens": -1}, "calibrate_first_tokens"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynv.config(**kwargs)


def test_backend_without_the_plugin_says_so():
    from dyncompile.integrations.vllm.worker import backend

    with pytest.raises(RuntimeError, match="plugin was not loaded"):
        backend(None, [])
