"""Residual matcher: a sum one of whose terms is an ancestor of the others.

An add whose inputs are themselves adds read by nothing else is one sum of all
their terms: ``x + attn(ln(x)) + mlp(ln(x))`` (a parallel block, however the
sum is bracketed) is one residual whose skip is ``x`` and whose branches are
the attention and the MLP. The ancestor term is the skip path; the nodes on
the paths from it to the other terms form the branch. A branch must hold real
compute (a linear layer or an attention core), so bias adds, position-embedding
adds and rotary sums are not residuals.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
from torch import fx

from ..blocks import ResidualBlock
from ..graph_utils import is_param, position, shape_of, tensor_value
from ..linears import LinearSite

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCS:
        return n.kwargs.get("alpha", 1) == 1 and len(n.args) >= 2
    return n.op == "call_method" and n.target in _ADD_METHODS and len(n.args) >= 2 \
        and n.kwargs.get("alpha", 1) == 1


def _is_inner(n: fx.Node) -> bool:
    """An add whose only reader is another add of the same shape: a term of a larger sum."""
    if not _is_add(n) or len(n.users) != 1:
        return False
    user = next(iter(n.users))
    return _is_add(user) and n in user.args[:2] and shape_of(user) == shape_of(n)


def _sum_terms(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The terms of the sum ``root`` ends (in argument order) and its inner adds."""
    terms: list[fx.Node] = []
    inner: list[fx.Node] = []
    stack = [root]
    while stack:
        n = stack.pop()
        for a in reversed(n.args[:2]):
            if not isinstance(a, fx.Node):
                continue
            if _is_inner(a):
                inner.append(a)
                stack.append(a)
            else:
                terms.append(a)
    terms.reverse()
    return terms, inner


def _float_like(n: fx.Node, shape: tuple | None) -> bool:
    t = tensor_value(n)
    return (t is not None and t.is_floating_point() and t.dim() >= 2
            and shape_of(n) == shape and not is_param(n))


def find_residuals(graph: fx.Graph, g: nx.DiGraph, linears: dict[fx.Node, LinearSite],
                   cores: set[fx.Node]) -> list[ResidualBlock]:
    out = []
    compute = set(linears) | cores
    for node in graph.nodes:
        if not _is_add(node) or _is_inner(node):
            continue
        shape = shape_of(node)
        terms, inner = _sum_terms(node)
        terms = [t for t in terms if _float_like(t, shape)]
        if len(terms) < 2:
            continue
        ancestors = {t: nx.ancestors(g, t) for t in terms}
        best: tuple | None = None
        # The skip: the term that most other terms descend from (the earliest on a tie).
        for skip in sorted(terms, key=position):
            branches = [t for t in terms if t is not skip and skip in ancestors[t]]
            if not branches:
                continue
            reach = set().union(*(ancestors[t] for t in branches))
            region = (nx.descendants(g, skip) & reach) | set(branches)
            if not region & compute:
                continue
            if best is None or len(branches) > len(best[1]):
                best = (skip, branches, region)
        if best is None:
            continue
        skip, branches, region = best
        inside = region & compute
        nodes = sorted(region | set(inner) | {node}, key=position)
        flops = sum((linears[n].flops() for n in inside if n in linears), 0)
        out.append(ResidualBlock(
            kind="residual", name="", nodes=nodes, weights=[], flops=flops,
            weight_bytes=sum(linears[n].weight_bytes() for n in inside if n in linears),
            output=node, add=node, skip=skip, branch_output=_branch_side(node, skip, branches),
            branches=branches,
        ))
    return out


def _branch_side(root: fx.Node, skip: fx.Node, branches: list[fx.Node]) -> fx.Node:
    """The input of ``root`` that is not the skip when the skip is one of them (``x + f(x)``,
    ``x + (attn + mlp)``); for a sum that holds the skip deeper (``(x + attn) + mlp``), the
    input that holds no skip, a branch term."""
    a, b = root.args[0], root.args[1]
    if skip is a or skip is b:
        return b if skip is a else a
    for arg in (a, b):
        if isinstance(arg, fx.Node) and not (_is_inner(arg) and skip in _sum_terms(arg)[0]):
            return arg
    return branches[-1]
