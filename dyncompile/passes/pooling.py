"""Find where a head reduces the stream before it mixes channels: its pooling region.

A classifier or embedding head often starts by pooling the final stream over
tokens (mean over the attention mask, the first token, the last position) and
only then applies norms and linears. Those first ops are linear in the stream
and act alike on every channel, so for any affine map ``A(x) = x @ W.T + b``
on the channels

    pool(A(x)) = pool(x) @ W.T + pool(ones) * b

An early exit can then pool first and apply its adapter to one row per sample
instead of to every token. :func:`find_pooling` finds the region on the graph
(ops that can be such a map, with the stream in one operand); the runtime
confirms the identity numerically on real values before it relies on it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from .graph_utils import is_tensor, shape_of, sym

# Ops that may keep a value linear in the stream and channel-uniform; with the stream in
# the first operand only (mul: either operand).
_FUNCTIONS = {operator.getitem, operator.mul, operator.truediv, torch.mul, torch.div,
              torch.sum, torch.mean, torch.squeeze, torch.unsqueeze, torch.select,
              torch.narrow, torch.reshape}
_METHODS = {"mul", "div", "sum", "mean", "to", "float", "type_as", "contiguous", "expand",
            "unsqueeze", "squeeze", "view", "reshape", "select", "narrow", "clone"}
_COMMUTES = {operator.mul, torch.mul, "mul"}


@dataclass
class Pooling:
    """The pooling region of a head: ``nodes`` (in graph order, with the non-stream values
    they need) computes ``outputs`` (the pooled values the rest of the head reads)."""

    nodes: list[fx.Node]
    outputs: list[fx.Node]


def _allowed(n: fx.Node, region: set[fx.Node]) -> bool:
    if n.op == "call_function":
        ok = n.target in _FUNCTIONS
    elif n.op == "call_method":
        ok = n.target in _METHODS
    else:
        return False
    if not ok:
        return False
    tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
    inside = [a for a in tensor_args if a in region]
    if len(inside) != 1:
        return False  # the stream twice (x * x) is not linear
    if n.target not in _COMMUTES and n.args[0] not in region:
        return False  # the stream as a divisor, or as an index
    return not any(isinstance(v, fx.Node) and v in region for v in n.kwargs.values())


def _smaller(out: fx.Node, stream: fx.Node) -> bool:
    """``out`` holds fewer values per sample than ``stream`` (fewer dims, or a dim cut to a
    constant the stream's is not)."""
    o, s = shape_of(out), shape_of(stream)
    if o is None or s is None or not o or o[-1] != s[-1]:
        return False
    if len(o) < len(s):
        return True
    if len(o) != len(s):
        return False
    for a, b in zip(o[1:-1], s[1:-1]):
        ea, eb = sym(a), sym(b)
        if isinstance(ea, sympy.Integer) and (not isinstance(eb, sympy.Integer) or ea < eb):
            return True
    return False


def live_nodes(nodes: list[fx.Node], outputs: list[fx.Node],
               stop: set[fx.Node] | None = None) -> set[fx.Node]:
    """The nodes among ``nodes`` that some output depends on (not looking past ``stop``:
    those count as inputs)."""
    members = set(nodes) - (stop or set())
    live: set[fx.Node] = set()
    todo = [o for o in outputs if o in members]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(u for u in n.all_input_nodes if u in members)
    return live


def find_pooling(head_nodes: list[fx.Node], stream: fx.Node,
                 head_outputs: list[fx.Node]) -> Pooling | None:
    """The pooling region of a head reading ``stream``, or None when the head reads the
    stream per token (or returns it), or the region does not shrink it."""
    if stream in head_outputs:
        return None
    members = live_nodes(head_nodes, head_outputs)
    head_nodes = [n for n in head_nodes if n in members]
    order = {n: i for i, n in enumerate(head_nodes)}
    region: set[fx.Node] = {stream}
    changed = True
    while changed:
        changed = False
        for n in head_nodes:
            if n in region or not is_tensor(n):
                continue
            if any(a in region for a in n.all_input_nodes) and _allowed(n, region):
                region.add(n)
                changed = True
    frontier = []
    for n in sorted(region - {stream}, key=order.__getitem__):
        users = [u for u in n.users if is_tensor(u) or u.op == "output"]
        if n in head_outputs or any(u not in region for u in users):
            frontier.append(n)
    direct = [u for u in stream.users if u in members and u not in region and is_tensor(u)]
    if direct or not frontier or not all(_smaller(o, stream) for o in frontier):
        return None
    # The region's own inputs it computes from outside the stream (masks, counts, sizes).
    needed: set[fx.Node] = set()
    todo = list(frontier)
    while todo:
        n = todo.pop()
        if n in needed or n not in members:
            continue
        needed.add(n)
        todo.extend(n.all_input_nodes)
    return Pooling(nodes=sorted(needed, key=order.__getitem__), outputs=frontier)
