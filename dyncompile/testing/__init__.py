"""Helpers for users' own CI: check an optimized model against its dense self.

    from dyncompile.testing import assert_matches_dense, assert_compute_falls, assert_no_recompile

Each takes the original model, the optimized one (``dyncompile.optimize``) and
inputs (a dict of kwargs or a tuple of args), and raises AssertionError with a
readable message when the property does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.budget import budget as budget_ctx
from ..core.stats import compile_count
from ..module import call_batch

__all__ = ["assert_compute_falls", "assert_matches_dense", "assert_no_recompile",
           "capture_passes", "compare_outputs", "flatten_outputs"]


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """All tensors of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    if hasattr(out, "key_cache") or hasattr(out, "layers"):  # KV caches: compared elsewhere
        return []
    return []


def compare_outputs(a: Any, b: Any, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Largest absolute difference between two model outputs; raises if structures differ."""
    ta, tb = flatten_outputs(a), flatten_outputs(b)
    if len(ta) != len(tb):
        raise AssertionError(f"outputs differ in structure: {len(ta)} vs {len(tb)} tensors")
    worst = 0.0
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x.shape != y.shape:
            raise AssertionError(f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.is_floating_point():
            diff = (x.detach().float() - y.detach().float()).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            if not torch.allclose(x.detach().float(), y.detach().float(), atol=atol, rtol=rtol):
                raise AssertionError(f"output {i} differs from dense: max abs diff "
                                     f"{float(diff.max()):.3g} (atol={atol}, rtol={rtol})")
        elif not torch.equal(x, y):
            raise AssertionError(f"output {i} (non-float) differs from dense")
    return worst


def assert_matches_dense(model: torch.nn.Module, optimized: Callable, inputs: Any,
                         atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """At budget 1.0 the optimized model returns the dense model's outputs. Returns max diff."""
    with torch.no_grad():
        ref = call_batch(model, inputs)
        with budget_ctx(1.0):
            out = call_batch(optimized, inputs)
    return compare_outputs(out, ref, atol, rtol)


def _spent(optimized: Any) -> float:
    stats = getattr(optimized, "stats", None)
    if stats is None:
        from ..core.stats import last_call

        stats = last_call()
    return stats.fraction


def assert_compute_falls(optimized: Callable, inputs: Any,
                         budgets: Sequence[float] = (1.0, 0.75, 0.5, 0.3),
                         tolerance: float = 1e-6) -> list[float]:
    """Spent compute (``opt.stats.fraction``) is non-increasing as the budget falls,
    and strictly lower at the smallest budget than at the largest. Returns the fractions."""
    budgets = sorted(budgets, reverse=True)
    spent = []
    with torch.no_grad():
        for b in budgets:
            with budget_ctx(b):
                call_batch(optimized, inputs)
            spent.append(_spent(optimized))
    for (b0, s0), (b1, s1) in zip(zip(budgets, spent), zip(budgets[1:], spent[1:])):
        if s1 > s0 + tolerance:
            raise AssertionError(f"compute rose from {s0:.4f} at budget {b0} to {s1:.4f} at {b1}")
    if not spent[-1] < spent[0] - tolerance:
        raise AssertionError(f"compute did not fall: {spent[0]:.4f} at budget {budgets[0]} and "
                             f"{spent[-1]:.4f} at budget {budgets[-1]}")
    return spent


def assert_no_recompile(optimized: Callable, inputs: Any,
                        budgets: Sequence[float] = (1.0, 0.8, 0.6, 0.4, 0.2)) -> int:
    """Calls at several budgets compile nothing new (after one warm-up call).
    Returns the number of graphs compiled during the warm-up."""
    with torch.no_grad():
        before = compile_count()
        call_batch(optimized, inputs)
        warm = compile_count() - before
        start = compile_count()
        for b in budgets:
            with budget_ctx(b):
                call_batch(optimized, inputs)
        extra = compile_count() - start
    if extra:
        raise AssertionError(f"{extra} graph(s) recompiled across budgets {list(budgets)}")
    return warm


def capture_passes(model: torch.nn.Module, inputs: Any, **options: Any) -> list:
    """Trace ``model`` and run the dyn passes on each graph, without compiling.

    Returns one list of ``Snapshot`` per graph: the graph before the passes
    (``after == "input"``) and after each pass, with its code and op counts.
    ``options`` are the backend's (``methods=[...]``, ``form_options=...``).
    """
    from ..core.budget import BudgetState
    from ..core.config import DynConfig
    from ..passes.base import PassContext
    from ..passes.manager import PassManager

    config = DynConfig.from_options({"compiler": "eager", **options})
    graphs: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        snaps: list = []
        ctx = PassContext(config=config, example_inputs=list(example_inputs),
                          state=BudgetState(config.budget))
        PassManager.from_config(config).run(gm, ctx, capture=snaps)
        graphs.append(snaps)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            call_batch(torch.compile(model, backend=backend), inputs)
    finally:
        torch._dynamo.reset()
    return graphs
