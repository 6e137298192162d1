"""Find the linear layers of a graph, whatever form they were written in.

A *linear site* is a node that multiplies an activation by a trained weight:
``F.linear(x, W, b)``, ``torch.addmm(b, x2d, W)`` (HF Conv1D), or
``x @ W`` / ``torch.matmul(x, W)`` optionally followed by ``+ b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
from torch import fx

from .graph_utils import (
    is_weight_like,
    numel_expr,
    op_kind,
    param_name,
    root_param,
    shape_of,
)


@dataclass(eq=False)
class LinearSite:
    """One linear layer found on the graph."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    in_features: int
    out_features: int
    layout: str  # "out_in" (F.linear weight) or "in_out" (Conv1D / x @ W)
    output: fx.Node

    @property
    def weight_name(self) -> str:
        return param_name(self.weight)

    @property
    def module_path(self) -> str:
        name = self.weight_name
        return name.rsplit(".", 1)[0] if "." in name else name

    @property
    def logical_input(self) -> fx.Node:
        """The activation before any flattening view the op needed (Conv1D)."""
        x = self.x
        if op_kind(x) == "view" and isinstance(x.args[0], fx.Node) and shape_of(x.args[0]):
            return x.args[0]
        return x

    def rows(self) -> sympy.Expr:
        shape = shape_of(self.x)
        if not shape:
            return sympy.Integer(0)
        return numel_expr(shape[:-1])

    def flops(self) -> sympy.Expr:
        return 2 * self.rows() * self.in_features * self.out_features

    def weight_bytes(self) -> int:
        w = root_param(self.weight)
        val = w.meta.get("example_value", w.meta.get("val")) if w is not None else None
        if val is None:
            return 0
        return int(self.in_features * self.out_features * val.element_size())


def _int(x: object) -> int:
    return int(x)  # parameter shapes are static


def match_linear(node: fx.Node) -> LinearSite | None:
    kind = op_kind(node)
    if kind == "linear":
        x = node.args[0]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(x, fx.Node) and is_weight_like(w)) or is_weight_like(x):
            return None
        wshape = shape_of(w)
        if wshape is None or len(wshape) != 2:
            return None
        return LinearSite(node, x, w, b if isinstance(b, fx.Node) else None,
                          _int(wshape[1]), _int(wshape[0]), "out_in", node)
    if kind == "addmm":
        b, x, w = node.args[:3]
        if not (isinstance(x, fx.Node) and is_weight_like(w)) or is_weight_like(x):
            return None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        wshape = shape_of(w)
        out = node
        users = list(node.users)
        if len(users) == 1 and op_kind(users[0]) == "view":
            out = users[0]
        return LinearSite(node, x, w, b if is_weight_like(b) else None,
                          _int(wshape[0]), _int(wshape[1]), "in_out", out)
    if kind == "matmul" and node.target is not None and len(node.args) == 2:
        x, w = node.args
        if not (isinstance(x, fx.Node) and is_weight_like(w)) or is_weight_like(x):
            return None
        wshape = shape_of(w)
        if wshape is None or len(wshape) != 2:
            return None
        layout = "in_out"  # x @ w: the weight operand is [in, out] (maybe a view of W.t())
        fin, fout = (wshape[0], wshape[1])
        out, bias = node, None
        users = list(node.users)
        if len(users) == 1 and op_kind(users[0]) == "arith" and users[0].target in _ADDS:
            other = [a for a in users[0].args if a is not node]
            if other and is_weight_like(other[0]):
                out, bias = users[0], other[0]
        return LinearSite(node, x, w, bias, _int(fin), _int(fout), layout, out)
    return None


def _adds() -> set:
    import operator

    import torch

    return {operator.add, torch.add, "add"}


_ADDS = _adds()


def find_linears(graph: fx.Graph) -> dict[fx.Node, LinearSite]:
    """All linear sites of a graph, keyed by their op node."""
    out = {}
    for node in graph.nodes:
        site = match_linear(node)
        if site is not None:
            out[node] = site
    return out
