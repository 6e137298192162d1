"""The parameters behind a graph's weight placeholders, and their memory layout.

Forms read weights in a fixed orientation (an active channel as one
contiguous row). ``transposed`` inserts ``torch.t(W)`` and queues a one-time,
in-place change of the parameter's memory order (same values and shape) to run
after the first call: changing strides inside the backend would fail dynamo's
guards for the frame being compiled, so it costs one recompile, once.
"""

from __future__ import annotations

import torch
from torch import fx

from .base import PassContext
from .graph_utils import is_param, placeholder_info


class Weights:
    """Parameter lookup and layout changes for one graph."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, convert: bool = True) -> None:
        self.ctx = ctx
        self.convert = convert
        self.index = {n: i for i, n in enumerate(
            n for n in gm.graph.nodes if n.op == "placeholder")}

    def param(self, node: fx.Node | None) -> torch.nn.Parameter | None:
        """The parameter a placeholder stands for (None for inputs and non-placeholders)."""
        if node is None or not (node.op == "placeholder" and is_param(node)
                                and node in self.index):
            return None
        i = self.index[node]
        p = self.ctx.example_inputs[i] if i < len(self.ctx.example_inputs) else None
        return p if isinstance(p, torch.nn.Parameter) else None

    def name(self, node: fx.Node | None) -> str:
        return placeholder_info(node)[1] if node is not None else ""

    def transposed(self, g: fx.Graph, weight: fx.Node, form: str) -> fx.Node:
        """``weight.t()`` in the graph; the parameter's memory follows after the first call."""
        p = self.param(weight)
        if p is not None and p.dim() == 2 and self.convert and not p.t().is_contiguous():
            def convert(p: torch.nn.Parameter = p) -> None:
                if not p.t().is_contiguous():
                    with torch.no_grad():
                        p.data = p.data.t().contiguous().t()

            self.ctx.after_first_call.append(convert)
            self.ctx.log.append(f"{form}: {self.name(weight)} -> transposed memory after the "
                                "first call")
        return g.call_function(torch.t, (weight,))
