"""The ``dyn`` dynamo backend: normalize -> detect -> rewrite -> compile.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="dyn", options={...})`` works after ``import torch``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sympy
import torch
from torch import fx

from .core import stats as _stats
from .core.budget import BudgetState
from .core.config import DynConfig
from .passes.cost import size_symbols
from .passes.manager import PassContext, PassManager, Snapshot

log = logging.getLogger("dyncompile")


class _DenseCost:
    """Dense FLOPs of one graph for the sizes of each call (lambdified once)."""

    def __init__(self, gm: fx.GraphModule, total: sympy.Expr, relevant: set) -> None:
        total = sympy.sympify(total)
        mapping = size_symbols(gm, relevant)
        self.const = None if total.free_symbols else float(total)
        self.where: list[tuple[int, int, sympy.Symbol]] = []
        if self.const is None:
            by_name = {str(v): v for v in mapping.values()}
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            from .passes.graph_utils import sym, tensor_value

            for i, node in enumerate(placeholders):
                val = tensor_value(node)
                if val is None:
                    continue
                for d, size in enumerate(val.shape):
                    s = mapping.get(sym(size))
                    if s is not None and str(s) in by_name:
                        self.where.append((i, d, s))
            syms = sorted(total.free_symbols, key=str)
            self.syms = syms
            self.fn = sympy.lambdify(syms, total, "math")

    def __call__(self, args: tuple) -> float:
        if self.const is not None:
            return self.const
        values: dict[sympy.Symbol, int] = {}
        for i, d, s in self.where:
            if s not in values and isinstance(args[i], torch.Tensor):
                values[s] = args[i].shape[d]
        return float(self.fn(*[values.get(s, 1) for s in self.syms]))


def _tapped(gm: fx.GraphModule, taps: list[tuple[list[fx.Node], Callable[[list[Any]], None]]]
            ) -> Callable[..., Any] | None:
    """The graph run eagerly, handing the values of the tapped nodes to their sinks after
    each call (``PassContext.taps``); None when there is nothing to tap."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    live = [(nodes, sink) for nodes, sink in taps if all(n in val_map for n in nodes)]
    if not live:
        return None
    graph.output((out, tuple(val_map[n] for nodes, _ in live for n in nodes)))
    probe = fx.GraphModule(gm, graph, class_name="Tapped")

    def run(*args: Any) -> Any:
        result, values = probe(*args)
        i = 0
        for nodes, sink in live:
            sink(list(values[i:i + len(nodes)]))
            i += len(nodes)
        return result

    return run


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], config: DynConfig,
                  state: BudgetState | None = None,
                  capture: list[Snapshot] | None = None,
                  inductor_options: dict[str, Any] | None = None) -> Callable:
    """Run the passes on one dynamo graph and compile it; returns the callable dynamo runs.

    ``inductor_options``: Inductor config patches for the compile (a serving engine's own).
    """
    state = state or BudgetState(config.budget)
    manager = PassManager.from_config(config)
    ctx = PassContext(config=config, example_inputs=list(example_inputs), state=state)
    gm = manager.run(gm, ctx, capture=capture)
    for form, names in ctx.rewritten.items():
        state.rewritten.setdefault(form, {}).update(dict.fromkeys(names))
    for line in ctx.log:
        log.info(line)
    blocks = ctx.blocks
    cost = _DenseCost(gm, blocks.total_flops if blocks is not None else 0,
                      blocks.raw_symbols if blocks is not None else set())
    runner = ctx.program if ctx.program is not None else gm
    # While calibrating, the graph runs eagerly with the forms' taps as extra outputs.
    tapped = _tapped(gm, ctx.taps) if ctx.taps and ctx.program is None else None
    calibrate_with = tapped or runner
    pending = state.pending_calibration()
    if pending and not state.calibrating and state.auto_calibrate:
        log.warning("dyncompile: no calibration data for %s; calibrating on the first inputs "
                    "seen (pass calibration=... to optimize() for better thresholds)",
                    ", ".join(pending))
        state.calibrating = True
        try:
            with torch.no_grad():
                calibrate_with(*example_inputs)
        finally:
            state.calibrating = False
        state.finalize_calibration()

        def run_at(value: float) -> None:
            from .core.budget import budget

            with torch.no_grad(), budget(value):
                state.sync()
                runner(*example_inputs)

        state.refine_calibration(run_at)
    if ctx.program is not None:
        ctx.program.compile(config.compiler)
        compiled = ctx.program
    elif config.compiler == "eager":
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=inductor_options or None)
    _stats.count_compile()

    deferred = list(ctx.after_first_call)

    def run(*args: Any) -> Any:
        value = state.sync()
        _stats.record_graph(cost(args), value)
        out = tapped(*args) if tapped is not None and state.calibrating else compiled(*args)
        if deferred:
            for fn in deferred:
                fn()
            deferred.clear()
        return out

    run._dyn_blocks = blocks  # type: ignore[attr-defined]
    return run


def dyn_backend(gm: fx.GraphModule, example_inputs: list[Any],
                options: dict[str, Any] | None = None, mode: str | None = None) -> Callable:
    """Dynamo backend entry point (``backend="dyn"``)."""
    options = dict(options or {})
    state = options.pop("state", None)
    config = DynConfig.from_options(options)
    return compile_graph(gm, example_inputs, config, state)
