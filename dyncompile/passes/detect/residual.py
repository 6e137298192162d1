"""Residual matcher: an add whose one input is an ancestor of the other.

The ancestor is the skip path; the nodes on the paths from it to the other
input form the branch. A branch must hold real compute (a linear layer or an
attention core), so bias adds, position-embedding adds and rotary sums are
not residuals.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
from torch import fx

from ..blocks import ResidualBlock
from ..graph_utils import position, shape_of, tensor_value
from ..linears import LinearSite

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCS:
        return n.kwargs.get("alpha", 1) == 1
    return n.op == "call_method" and n.target in _ADD_METHODS


def find_residuals(graph: fx.Graph, g: nx.DiGraph, linears: dict[fx.Node, LinearSite],
                   cores: set[fx.Node]) -> list[ResidualBlock]:
    out = []
    compute = set(linears) | cores
    for node in graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        ta, tb = tensor_value(a), tensor_value(b)
        if ta is None or tb is None or not ta.is_floating_point() or ta.dim() < 2:
            continue
        if shape_of(a) != shape_of(b):
            continue
        # Cheap filter by graph order before the reachability query.
        skip, branch = (a, b) if position(a) < position(b) else (b, a)
        anc = nx.ancestors(g, branch)
        if skip not in anc:
            continue
        region = (nx.descendants(g, skip) & anc) | {branch}
        inside = region & compute
        if not inside:
            continue
        nodes = sorted(region | {node}, key=position)
        flops = sum((linears[n].flops() for n in inside if n in linears), 0)
        out.append(ResidualBlock(
            kind="residual", name="", nodes=nodes, weights=[], flops=flops,
            weight_bytes=sum(linears[n].weight_bytes() for n in inside if n in linears),
            output=node, add=node, skip=skip, branch_output=branch,
        ))
    return out
