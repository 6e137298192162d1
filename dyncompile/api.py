"""Public entry points: ``optimize()`` and ``inspect()``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import nn

from .core.budget import validate_tolerance
from .core.config import DynConfig, default_methods, validate_budget, validate_methods
from .core.errors import trace_error
from .module import DynModule, call_batch, own_model
from .passes.blocks import Block, evaluate
from .passes.cost import bind_sizes
from .passes.detect import BlockSet, detect_blocks
from .plan.quality import Quality, validate_quality


def optimize(model: nn.Module, budget: float | None = None,
             methods: Iterable[str] | str | None = None,
             calibration: Iterable[Any] | None = None, *, tolerance: float | None = None,
             budget_unit: str = "flops", confidence: float = 0.9, compiler: str = "inductor",
             form_options: Mapping[str, Mapping[str, Any]] | None = None,
             dynamic: bool | None = None, inplace: bool = False,
             plan: bool = True, quality: Quality = "auto") -> DynModule:
    """Compile ``model`` with the ``dyn`` backend and return a budget-controlled module.

    budget: default fraction of the whole model's dense FLOPs to spend, in (0, 1]
        (default 1.0: dense); change it any time with ``opt.budget = b`` or
        ``with dyncompile.budget(b):``; no recompile.
    methods: adaptive forms to apply (see ``dyncompile.known_methods()``); None (the
        default) means every form of ``dyncompile.default_methods()`` that finds
        something to rewrite, planned together;
        ``[]`` applies none.
    calibration: batches (dicts of kwargs, tuples of args, or tensors) shaped like the
        inputs to come, run now to trace, compile, fit the forms and plan them (the last
        third is held out to measure quality). Without it, the first call calibrates.
    tolerance: instead of a budget, the mean quality loss allowed (1 - cosine of the
        outputs, or top-1 disagreement of logits): calls run at the cheapest planned
        point certified within it at ``confidence`` on the held-out rows.
    budget_unit: "flops" (default) or "time": the budget as a fraction of the dense
        model's measured time on this device.
    compiler: "inductor" (default) or "eager" (rewritten graph, not compiled).
    quality: how the planner measures quality loss per row: "auto" (top-1 disagreement
        for outputs with ``logits``, else 1 - cosine of the output vectors), "top1" (the
        output is logits: a model returning a bare logits tensor), "cosine", or a
        callable ``fn(dense_output, output)`` returning per-row losses in [0, 1].
    plan: measure the forms and plan them (default). ``plan=False`` skips it: each form
        then reads the budget as its own knob (``gated``: the share of its linears'
        work, ``expert``: of its FFNs', ``early_exit``: of the layer stack's), and a
        tolerance is not available.
    inplace: let forms that change parameters (``gated``: memory order; ``expert``:
        a function-preserving permutation) change ``model`` itself. By default they
        work on a copy (``opt.model``) and ``model`` is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    if budget is not None and tolerance is not None:
        raise ValueError("give a budget or a tolerance, not both (a tolerance picks the "
                         "cheapest planned point that keeps the quality within it)")
    if tolerance is not None:
        tolerance = validate_tolerance(tolerance)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
            0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    quality = validate_quality(quality)
    auto = methods is None
    config = DynConfig(budget=validate_budget(1.0 if budget is None else budget),
                       methods=default_methods() if auto else validate_methods(methods),
                       compiler=compiler, form_options=dict(form_options or {}),
                       budget_unit=budget_unit, auto=auto)
    opt = DynModule(own_model(model, config.methods, inplace), config, dynamic=dynamic)
    opt.state.confidence = float(confidence)
    opt.planned = bool(plan)
    opt.quality = quality
    if calibration is not None:
        opt.calibrate(calibration, plan=plan)
    elif config.methods:
        opt._calibrate_on_first_call = True
    if tolerance is not None:
        if calibration is None:
            raise ValueError("a tolerance is certified on held-out calibration rows: pass "
                             "calibration=[batches] (at least 2)")
        opt.tolerance = tolerance
    return opt


@dataclass
class InspectReport:
    """What ``inspect()`` found: blocks of every traced graph and their FLOP shares."""

    blocks: list[Block]
    graphs: list[BlockSet]
    sizes: dict[str, int] = field(default_factory=dict)
    total_flops: sympy.Expr = sympy.Integer(0)

    @property
    def counts(self) -> dict[str, int]:
        return {k: sum(1 for b in self.blocks if b.kind == k)
                for k in ("ffn", "attention", "residual")}

    def share(self, block: Block) -> float:
        """Fraction of the whole model's modelled FLOPs this block costs at the example sizes."""
        total = evaluate(self.total_flops, self.sizes)
        return block.flops_at(self.sizes) / total if total else 0.0

    def table(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items()) or "static shapes"
        total = evaluate(self.total_flops, self.sizes)
        rows = [(b.kind, b.name, str(b.flops), f"{100 * self.share(b):5.1f}%") for b in self.blocks]
        head = ("kind", "name", "FLOPs", "share")
        widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(4)]
        widths[2] = min(widths[2], 40)
        fmt = "  ".join(f"{{:{'>' if i == 3 else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(k, n, f if len(f) <= 40 else f[:37] + "...", s)
                  for k, n, f, s in rows]
        c = self.counts
        lines.append("")
        lines.append(f"{c['ffn']} ffn, {c['attention']} attention, {c['residual']} residual "
                     f"blocks in {len(self.graphs)} graph(s); model FLOPs {self.total_flops} "
                     f"= {total:.3e} at {sizes}")
        if not self.blocks:
            lines.append("no FFN, attention or residual blocks found")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _mark_dynamic(inputs: Any) -> None:
    tensors = list(inputs.values()) if isinstance(inputs, dict) else (
        list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            continue
        dims = range(min(2, t.dim())) if t is first or t.shape[:2] == first.shape[:2] else []
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)


def inspect(model: nn.Module, example_inputs: Any, *, symbolic: bool = True) -> InspectReport:
    """Trace ``model`` on ``example_inputs`` (args tuple or kwargs dict); report its blocks.

    Costs are sympy expressions in the batch ``B`` and sequence ``S`` sizes
    when ``symbolic`` (sizes of 1 stay constant); shares are evaluated at the
    example's sizes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect() takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list, dict, torch.Tensor)):
        raise TypeError("example_inputs must be a tuple of positional args or a dict of kwargs")
    graphs: list[BlockSet] = []
    sizes: dict[str, int] = {}

    def capture(gm: torch.fx.GraphModule, args: list[Any]) -> Any:
        found = detect_blocks(gm)
        graphs.append(found)
        sizes.update(bind_sizes(gm, list(args), found.raw_symbols))
        return gm.forward

    if symbolic:
        _mark_dynamic(example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture)
    try:
        with torch.no_grad():
            call_batch(compiled, example_inputs)
    except Exception as e:
        from .module import _is_dynamo_error

        if _is_dynamo_error(e):
            raise trace_error(model, e) from e
        raise
    finally:
        torch._dynamo.reset()
    blocks = [b for g in graphs for b in g.blocks]
    total = sum((g.total_flops for g in graphs), sympy.Integer(0))
    used = {str(s) for s in sympy.sympify(total).free_symbols}
    sizes = {k: v for k, v in sizes.items() if k in used}
    return InspectReport(blocks=blocks, graphs=graphs, sizes=sizes, total_flops=total)

