"""The main residual stream of a traced graph: its chain of residual blocks, and the
stream values at which the graph can be cut into pieces run one after another."""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx

from .blocks import ResidualBlock
from .graph_utils import node_value, position, tensor_value


def stream_chain(residuals: list[ResidualBlock], g: nx.DiGraph) -> list[ResidualBlock]:
    """The residual blocks of the main stream, in order: walking back from the last
    residual add, each step takes the latest residual whose add feeds the skip input."""
    if not residuals:
        return []
    chain = [max(residuals, key=lambda r: position(r.add))]
    while True:
        skip = chain[-1].skip
        anc = nx.ancestors(g, skip) | {skip}
        prev = [r for r in residuals if r.add in anc and r not in chain]
        if not prev:
            break
        chain.append(max(prev, key=lambda r: position(r.add)))
    chain.reverse()
    return chain


def _follow(start: fx.Node, like: list[fx.Node]) -> fx.Node | None:
    """Walk from ``start`` through users with the same targets as the path ``like``."""
    cur = start
    for step in like:
        nxt = [u for u in cur.users if u.op == step.op and u.target == step.target]
        if len(nxt) != 1:
            return None
        cur = nxt[0]
    return cur


def final_state(add: fx.Node, next_input: fx.Node, last_add: fx.Node,
                g: nx.DiGraph) -> fx.Node | None:
    """The stream's final state: ``last_add`` followed by the ops that lead from a block's
    ``add`` to the ``next_input`` of the block after it (a post-norm stack's norm; none
    in a pre-norm stack). None when those ops are not a path."""
    if add is next_input:
        return last_add
    try:
        path = nx.shortest_path(g, add, next_input)
    except nx.NetworkXNoPath:
        return None
    return _follow(last_add, path[1:]) or last_add


def _carries_data(node: fx.Node) -> bool:
    v = node_value(node)
    if isinstance(v, (tuple, list)):
        return any(isinstance(x, torch.Tensor) for x in v)
    return isinstance(v, torch.Tensor)


def data_descendants(start: fx.Node) -> set[fx.Node]:
    """Nodes whose tensor values depend on ``start``'s values (not only on its dtype,
    device or shape: the walk stops at nodes that produce no tensor)."""
    seen = {start}
    todo = [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen and _carries_data(u):
                seen.add(u)
                todo.append(u)
    return seen


def clean_cuts(gm: fx.GraphModule, stream: list[fx.Node]) -> list[int]:
    """Indices k >= 1 of stream values that cut the graph cleanly: nothing after b_k
    reads a stream-derived tensor from before it, other than b_k itself."""
    derived = data_descendants(stream[0])
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    good = []
    for k in range(1, len(stream) - 1):
        b = stream[k]
        ok = True
        for n in nodes[pos[b] + 1:]:
            if n.op == "output":
                continue
            for u in n.all_input_nodes:
                if pos[u] < pos[b] and u in derived and tensor_value(u) is not None:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            good.append(k)
    return good
