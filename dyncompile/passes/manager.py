"""Pass manager: the ordered graph passes built from a DynConfig."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

from torch import fx

from ..core.config import DynConfig
from ..core.registry import forms
from .base import Pass, PassContext
from .detect import detect_blocks
from .graph_utils import op_kind
from .normalize import expand_fused_attention


class NormalizePass(Pass):
    """Expand fused attention calls into plain ops (see passes.normalize)."""

    name = "normalize"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        n = expand_fused_attention(gm)
        if n:
            ctx.log.append(f"normalize: expanded {n} fused attention call(s)")


class DetectPass(Pass):
    """Find FFN, attention and residual blocks; stores them on the context."""

    name = "detect"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        ctx.blocks = detect_blocks(gm)
        ctx.log.append(f"detect: {ctx.blocks.counts()}")


@dataclass
class Snapshot:
    """The graph as one pass left it."""

    after: str
    code: str
    op_counts: Counter


def op_counts(gm: fx.GraphModule) -> Counter:
    """Count nodes by coarse kind, plus each custom-op target by name."""
    counts: Counter = Counter()
    for n in gm.graph.nodes:
        counts[op_kind(n)] += 1
        if n.op == "call_function" and "dyncompile" in str(n.target):
            counts[str(n.target)] += 1
    return counts


class PassManager:
    """Runs normalize -> detect -> each configured form, in that order."""

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = passes

    @classmethod
    def from_config(cls, config: DynConfig) -> PassManager:
        registry = forms()
        passes: list[Pass] = [NormalizePass(config), DetectPass(config)]
        passes += [registry[m](config) for m in
                   sorted(config.methods, key=lambda m: (registry[m].stage, m))]
        return cls(passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext,
            capture: list[Snapshot] | None = None) -> fx.GraphModule:
        gm.meta["dyn_state"] = ctx.state  # ops look the state up by id: keep it alive
        if capture is not None:
            capture.append(Snapshot("input", gm.code, op_counts(gm)))
        for p in self.passes:
            done = p.run(gm, ctx)
            if done is not None:
                ctx.rewritten.setdefault(p.name, []).extend(done)
                if not done and not ctx.config.auto:
                    found = ctx.blocks.counts() if ctx.blocks is not None else {}
                    warnings.warn(
                        f"dyncompile: form {p.name!r} rewrote nothing in this graph: it looks "
                        f"for {p.looks_for or 'its blocks'}; detection found {found}",
                        UserWarning, stacklevel=2)
            if capture is not None:
                capture.append(Snapshot(p.name, gm.code, op_counts(gm)))
        gm.graph.lint()
        gm.recompile()
        return gm
