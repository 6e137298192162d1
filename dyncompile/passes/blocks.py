"""Records of the blocks the detectors find on a graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
from torch import fx

from .linears import LinearSite


@dataclass
class WeightRef:
    """A trained tensor a block reads: its path in the model and its shape."""

    path: str
    shape: tuple[int, ...]


@dataclass
class Block:
    """A region of the graph with a known role.

    ``flops`` is a sympy expression in the graph's symbolic sizes (batch ``B``,
    sequence ``S``...) or a plain integer when the graph is static.
    """

    kind: str
    name: str
    nodes: list[fx.Node]
    weights: list[WeightRef]
    flops: sympy.Expr
    weight_bytes: int
    output: fx.Node
    extra: dict[str, Any] = field(default_factory=dict)

    def flops_at(self, sizes: dict[str, int] | None = None) -> float:
        """FLOPs with the symbolic sizes bound (unbound symbols count as 1)."""
        return evaluate(self.flops, sizes)

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}(name={self.name!r}, nodes={len(self.nodes)}, flops={self.flops})"


@dataclass(repr=False)
class FFNBlock(Block):
    """linear -> activation -> linear, or act(gate(x)) * up(x) -> down (GLU)."""

    up: list[LinearSite] = field(default_factory=list)
    down: LinearSite | None = None
    gate: LinearSite | None = None
    hidden: int = 0
    gated: bool = False
    fused_gate_up: bool = False
    activation: list[fx.Node] = field(default_factory=list)
    input: fx.Node | None = None


@dataclass(repr=False)
class AttentionBlock(Block):
    """q/k/v projections, an attention core (SDPA or matmul-softmax-matmul), output projection."""

    q: LinearSite | None = None
    k: LinearSite | None = None
    v: LinearSite | None = None
    o: LinearSite | None = None
    core: list[fx.Node] = field(default_factory=list)
    cross: bool = False
    fused_qkv: bool = False
    heads: int | None = None


@dataclass(repr=False)
class ResidualBlock(Block):
    """x + branch(x): the add, its skip input, and the nodes of the branch.

    A parallel block, ``x + attn(ln(x)) + mlp(ln(x))``, is one residual: ``add`` ends the
    sum, ``skip`` is ``x`` and ``branches`` holds each term computed from it."""

    add: fx.Node | None = None
    skip: fx.Node | None = None
    branch_output: fx.Node | None = None
    branches: list[fx.Node] = field(default_factory=list)
    contains: list[str] = field(default_factory=list)


def evaluate(expr: Any, sizes: dict[str, int] | None = None) -> float:
    """Bind named symbols in a cost expression; unbound symbols evaluate as 1."""
    expr = sympy.sympify(expr)
    subs = {}
    for s in expr.free_symbols:
        subs[s] = (sizes or {}).get(str(s), 1)
    return float(expr.subs(subs)) if subs else float(expr)
