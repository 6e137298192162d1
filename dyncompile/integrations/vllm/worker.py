"""The worker side: the backend vLLM compiles with, and what the engine's RPCs reach.

One :class:`Engine` per worker process holds the budget states of the graphs this
worker compiled, the engine's budget, calibration progress and counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ...backend import compile_graph
from ...core import stats as _stats
from ...core.budget import BudgetState, RowBudgets
from ...core.budget import budget as budget_override
from ...core.config import DynConfig, validate_budget

log = logging.getLogger("dyncompile")


@dataclass
class Engine:
    """This worker's dyncompile state (one engine per worker process)."""

    budget: float = 1.0
    states: list[BudgetState] = field(default_factory=list)
    rewritten: dict[str, int] = field(default_factory=dict)
    calibrating: bool = False
    # First-requests calibration: tokens still to record (0: not collecting).
    collect_tokens: int = 0
    calibrated_tokens: int = 0
    dense_flops: float = 0.0
    spent_flops: float = 0.0
    calls: int = 0
    tokens: int = 0
    active: float = 0.0  # gated sites: active (token, channel) pairs, and all pairs
    channels: float = 0.0
    # The running step's requests: (own budget or None, token rows) in vLLM's layout.
    requests: list[tuple[float | None, int]] | None = None
    _rows: tuple[int, RowBudgets | float | None] | None = None

    @property
    def calibrated(self) -> bool:
        return all(not s.pending_calibration() for s in self.states)

    def apply_budget(self) -> None:
        """Every state at the engine's budget, or dense while a form is uncalibrated."""
        value = self.budget if self.calibrated else 1.0
        for s in self.states:
            s.default = value

    def set_calibrating(self, on: bool) -> None:
        self.calibrating = on
        for s in self.states:
            s.calibrating = on

    def note_requests(self, budgets: list[Any], tokens: list[int]) -> None:
        """The next forward's requests: each one's own budget (None: the engine's) and
        its number of token rows, in the order vLLM lays the rows out."""
        self._rows = None
        if all(b is None for b in budgets):
            self.requests = None
            return
        own: list[float | None] = []
        for b in budgets:
            try:
                own.append(None if b is None else validate_budget(b))
            except ValueError as e:
                log.warning("dyncompile: a request's budget is ignored (%s)", e)
                own.append(None)
        self.requests = list(zip(own, tokens))

    def rows_for(self, n: int) -> RowBudgets | float | None:
        """What a forward over ``n`` token rows runs at: per-row budgets, one budget other
        than the engine's, or None (the engine's budget)."""
        if self.requests is None or not self.calibrated:
            return None
        if self._rows is not None and self._rows[0] == n:
            return self._rows[1]
        per_row: list[float] = []
        for b, t in self.requests:
            per_row.extend([self.budget if b is None else b] * t)
        per_row = (per_row + [self.budget] * n)[:n]  # padding rows: the engine's budget
        levels = set(per_row)
        got: RowBudgets | float | None
        if len(levels) > 1:
            got = RowBudgets.of(per_row)
        else:
            level = levels.pop() if levels else self.budget
            got = None if level == self.budget else level
        self._rows = (n, got)
        return got

    def finish_calibration(self) -> None:
        self.set_calibrating(False)
        for s in self.states:
            s.finalize_calibration()
        self.apply_budget()


ENGINE = Engine()


def options_of(vllm_config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dyncompile options, Inductor options) from vLLM's compilation config."""
    from . import OPTIONS_KEY

    inductor = dict(vllm_config.compilation_config.inductor_compile_config or {})
    options = inductor.pop(OPTIONS_KEY, None)
    if options is None:
        raise ValueError("dyncompile: the compilation config has no dyncompile options; "
                         "build it with dyncompile.integrations.vllm.config(...)")
    # Keys vLLM adds for its own compile passes, not Inductor options.
    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    inductor = {k: v for k, v in inductor.items() if k in known}
    return dict(options), inductor


def _num_tokens(args: tuple) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 1 and a.dtype in (torch.int32,
                                                                         torch.int64):
            return int(a.shape[0])
    return 0


def _real_batch() -> bool:
    """True inside a forward that serves requests (not vLLM's dummy and profile runs)."""
    from vllm import forward_context as fc  # loaded by then: a lookup per forward

    return fc.is_forward_context_available() and fc.get_forward_context().attn_metadata \
        is not None


def backend(gm: fx.GraphModule, example_inputs: list[Any], *,
            vllm_config: Any = None) -> Callable:
    """The Dynamo backend vLLM compiles its model with (see ``config()``)."""
    if vllm_config is None:
        raise RuntimeError(
            "dyncompile: this backend needs vLLM's config: the dyncompile vLLM plugin was "
            "not loaded (is dyncompile installed in vLLM's environment, and VLLM_PLUGINS "
            "unset or naming 'dyncompile'?)")
    options, inductor = options_of(vllm_config)
    engine = ENGINE
    engine.budget = float(options.get("budget", 1.0))
    config = DynConfig(budget=1.0, methods=tuple(options.get("methods", ())),
                       form_options=options.get("form_options", {}))
    state = BudgetState(1.0)
    state.auto_calibrate = False
    run = compile_graph(gm, example_inputs, config, state, inductor_options=inductor)
    engine.states.append(state)
    for form, names in state.rewritten.items():
        engine.rewritten[form] = engine.rewritten.get(form, 0) + len(names)
    if options.get("calibrate_first_tokens") and state.pending_calibration():
        engine.collect_tokens = int(options["calibrate_first_tokens"])
        log.warning("dyncompile: serving dense while the first %d tokens of real requests "
                    "calibrate %s", engine.collect_tokens,
                    ", ".join(state.pending_calibration()))
    elif state.pending_calibration():
        log.warning("dyncompile: %s not calibrated: serving dense until "
                    "dyncompile.integrations.vllm.calibrate(llm, prompts)",
                    ", ".join(state.pending_calibration()))
    engine.apply_budget()
    log.info("dyncompile: rewrote %s", ", ".join(
        f"{len(v)} {k} sites" for k, v in state.rewritten.items()) or "nothing")

    def call(*args: Any) -> Any:
        real = _real_batch()
        collect = engine.collect_tokens > 0 and real and not engine.calibrating
        n = _num_tokens(args) if real else 0
        rows = engine.rows_for(n) if real and not collect else None
        if collect:
            state.calibrating = True
        token = _stats.begin_call(state.default)
        try:
            if isinstance(rows, RowBudgets):
                state.rows = rows
                out = run(*args)
            elif rows is not None:  # every request at one budget of its own
                with budget_override(rows):
                    out = run(*args)
            else:
                out = run(*args)
        finally:
            state.rows = None
            if collect:
                state.calibrating = False
            call_stats = _stats.end_call(token)
        if real:
            engine.calls += 1
            engine.tokens += n
            engine.dense_flops += call_stats.dense_flops
            engine.spent_flops += call_stats.spent_flops
            active, channels = call_stats.counters.get("active_channels", (0.0, 0.0))
            engine.active += active
            engine.channels += channels
            if collect:
                engine.calibrated_tokens += n
                engine.collect_tokens = max(0, engine.collect_tokens - n)
                if engine.collect_tokens == 0:
                    engine.finish_calibration()
                    log.warning("dyncompile: calibrated on the first %d tokens of requests; "
                                "serving at budget %.3g", engine.calibrated_tokens,
                                engine.budget)
        return out

    call._dyn_state = state  # type: ignore[attr-defined]
    return call


# -- what the engine's collective_rpc runs in each worker (first argument: the worker) --
def rpc_set_budget(_worker: Any, value: float) -> float:
    ENGINE.budget = float(value)
    ENGINE.apply_budget()
    return ENGINE.budget


def rpc_calibration(_worker: Any, on: bool) -> dict[str, Any]:
    """Start (``on``) or finish recording the forms' calibration data."""
    if on:
        ENGINE.set_calibrating(True)
    else:
        ENGINE.finish_calibration()
    return rpc_stats(_worker, False)


def rpc_stats(_worker: Any, reset: bool) -> dict[str, Any]:
    e = ENGINE
    out = {"budget": e.budget, "calibrated": e.calibrated, "rewritten": dict(e.rewritten),
           "graphs": len(e.states), "calls": e.calls, "tokens": e.tokens,
           "dense_flops": e.dense_flops, "spent_flops": e.spent_flops,
           "spent": e.spent_flops / e.dense_flops if e.dense_flops else 1.0,
           "active": e.active / e.channels if e.channels else 1.0}
    if reset:
        e.calls = e.tokens = 0
        e.dense_flops = e.spent_flops = e.active = e.channels = 0.0
    return out


RPC = {"dyncompile_set_budget": rpc_set_budget, "dyncompile_calibration": rpc_calibration,
       "dyncompile_stats": rpc_stats}
