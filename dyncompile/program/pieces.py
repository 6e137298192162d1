"""Cut a graph into pieces: sub-GraphModules over chosen node sets, run one by one.

A :class:`Piece` holds the nodes of one region of a traced graph, the outside
values it reads (its placeholders, in order) and the values it hands on (its
outputs). A runtime evaluates pieces over an environment ``{node: value}``,
which lets it stop, slice the batch or substitute a value between pieces.
``get_attr`` nodes are copied into every piece that reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import fx


@dataclass(eq=False)
class Piece:
    """One region of a graph as a callable ``fn(*[env[n] for n in inputs]) -> outputs``."""

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    module: fx.GraphModule
    fn: Callable[..., Any] = field(init=False)

    def __post_init__(self) -> None:
        self.fn = self.module

    def run(self, env: dict[fx.Node, Any]) -> None:
        """Evaluate the piece on ``env`` and write its outputs back into it."""
        if not self.nodes:
            return
        outs = self.fn(*[env[n] for n in self.inputs])
        for node, value in zip(self.outputs, outs):
            env[node] = value


def build_piece(gm: fx.GraphModule, name: str, nodes: Iterable[fx.Node],
                outputs: Iterable[fx.Node]) -> Piece:
    """A sub-GraphModule computing ``outputs`` from the nodes ``nodes`` (graph order kept).

    Values the nodes read from outside the set become placeholders; outputs not
    computed inside the set are passed through from the inputs.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chosen = sorted({n for n in nodes if n.op not in ("placeholder", "output", "get_attr")},
                    key=order.__getitem__)
    inside = set(chosen)
    outputs = list(dict.fromkeys(outputs))
    inputs: list[fx.Node] = []
    for n in chosen:
        for u in n.all_input_nodes:
            if u not in inside and u.op != "get_attr" and u not in inputs:
                inputs.append(u)
    for o in outputs:
        if o not in inside and o not in inputs:
            inputs.append(o)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for u in inputs:
        ph = graph.placeholder(f"in_{u.name}")
        ph.meta = dict(u.meta)
        env[u] = ph

    def lookup(u: fx.Node) -> fx.Node:
        if u not in env:  # a get_attr read from the root module
            env[u] = graph.node_copy(u, lookup)
        return env[u]

    for n in chosen:
        env[n] = graph.node_copy(n, lookup)
    graph.output(tuple(env[o] for o in outputs))
    module = fx.GraphModule(gm, graph, class_name=f"Piece_{name}")
    return Piece(name=name, nodes=chosen, inputs=inputs, outputs=outputs, module=module)


def cut_at(gm: fx.GraphModule, stream: list[fx.Node]
           ) -> tuple[list[list[fx.Node]], list[fx.Node], list[list[fx.Node]]]:
    """The graph's computing nodes cut at the values ``stream[1:]``: (segments, head,
    handed on). Segment ``j`` ends at ``stream[j + 1]`` (the first one holds everything
    before it), the head is what follows the last; ``handed_on[j]`` lists the nodes of
    segment ``j`` that a later segment, the head or the output reads."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    cuts = [pos[b] for b in stream[1:]]
    segments: list[list[fx.Node]] = [[] for _ in cuts]
    head: list[fx.Node] = []
    for n in nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        j = next((i for i, c in enumerate(cuts) if pos[n] <= c), None)
        (head if j is None else segments[j]).append(n)
    handed_on: list[list[fx.Node]] = [[] for _ in cuts]
    later: set[fx.Node] = set(head) | {gm.graph.output_node()}
    for j in reversed(range(len(cuts))):
        handed_on[j] = [n for n in segments[j] if any(u in later for u in n.users)]
        later |= set(segments[j])
    return segments, head, handed_on
