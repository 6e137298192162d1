"""Symbolic cost model: FLOPs of the matmul-like ops of a graph, as sympy expressions.

Pointwise ops, norms and softmax are not counted: on every model here they
are a small share of the matmul FLOPs. Sizes that dynamo traced as symbols
are renamed after what they measure: ``B`` (batch, dim 0 of the first input)
and ``S`` (sequence, dim 1 of a token-id or (B, S, D) input); other symbolic
sizes are named ``<input>_<dim>``.
"""

from __future__ import annotations

import re

import sympy
import torch
from torch import fx

from .graph_utils import (
    einsum_flops,
    matmul_operands,
    numel_expr,
    op_kind,
    placeholder_info,
    shape_of,
    sym,
    tensor_value,
)
from .linears import LinearSite


def node_flops(node: fx.Node, linears: dict[fx.Node, LinearSite]) -> sympy.Expr:
    """FLOPs (multiply-adds counted as 2) of one node; 0 for ops not modelled."""
    if node in linears:
        return linears[node].flops()
    kind = op_kind(node)
    if kind == "matmul" and node.target is torch.einsum:
        flops = einsum_flops(node)
        return sympy.Integer(0) if flops is None else sympy.sympify(flops)
    if kind == "matmul":
        ops = matmul_operands(node)
        a = shape_of(ops[0]) if ops and isinstance(ops[0], fx.Node) else None
        out = shape_of(node)
        if a and out:
            return 2 * numel_expr(out) * sym(a[-1])
        return sympy.Integer(0)
    if kind == "sdpa":
        q, k = shape_of(node.args[0]), shape_of(node.args[1])
        if q and k:
            return 4 * numel_expr(q) * sym(k[-2])
        return sympy.Integer(0)
    if kind == "conv":
        w, out = shape_of(node.args[1]), shape_of(node)
        if w and out:
            return 2 * numel_expr(out) * numel_expr(w[1:])
    return sympy.Integer(0)


def graph_flops(graph: fx.Graph, linears: dict[fx.Node, LinearSite]) -> sympy.Expr:
    """Total modelled FLOPs of a graph."""
    total = sympy.Integer(0)
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            total = total + node_flops(node, linears)
    return sympy.expand(total)


def _short(name: str) -> str:
    name = re.sub(r"^(L_|l_)(kwargs_|args_)?", "", name).strip("_")
    return name or "x"


def size_symbols(gm: fx.GraphModule,
                 relevant: set | None = None) -> dict[sympy.Symbol, sympy.Symbol]:
    """Map dynamo's size symbols (s0, s1...) to readable names (B, S, ...).

    ``B`` is a symbolic dim 0 of an input, ``S`` a symbolic dim 1 of a token-id
    or (B, S, D) input; symbols in ``relevant`` (those the costs use) win.
    """
    found: list[tuple[sympy.Symbol, str, int, bool]] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or placeholder_info(node)[0] != "input":
            continue
        val = tensor_value(node)
        if val is None:
            continue
        seq_like = not val.is_floating_point() or val.dim() == 3
        for d, size in enumerate(val.shape):
            expr = sym(size)
            if isinstance(expr, sympy.Symbol):
                found.append((expr, _short(str(node.target)), d, seq_like))
    relevant = relevant or set()

    def pick(dim: int, seq: bool) -> sympy.Symbol | None:
        cands = [f[0] for f in found if f[2] == dim and (f[3] or not seq)]
        cands.sort(key=lambda s: s not in relevant)
        return cands[0] if cands else None

    mapping: dict[sympy.Symbol, sympy.Symbol] = {}
    for name, dim, seq in (("B", 0, False), ("S", 1, True)):
        s = pick(dim, seq)
        if s is not None and s not in mapping:
            mapping[s] = sympy.Symbol(name, positive=True, integer=True)
    for expr, input_name, d, _ in found:
        if expr not in mapping:
            mapping[expr] = sympy.Symbol(f"{input_name}_{d}", positive=True, integer=True)
    return mapping


def bind_sizes(gm: fx.GraphModule, args: list, relevant: set | None = None) -> dict[str, int]:
    """Concrete values of the named size symbols for real graph inputs."""
    out: dict[str, int] = {}
    mapping = size_symbols(gm, relevant)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, arg in zip(placeholders, args):
        val = tensor_value(node)
        if val is None or not isinstance(arg, torch.Tensor):
            continue
        for size, real in zip(val.shape, arg.shape):
            expr = sym(size)
            if expr in mapping:
                out[str(mapping[expr])] = int(real)
    return out
