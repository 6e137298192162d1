"""Block detection on a traced graph: FFN, attention and residual blocks.

``detect_blocks(gm)`` classifies nodes by what they compute; module names only
label the blocks found. Before matching it expands fused attention calls and writes
``x @ W.T`` on a parameter as ``F.linear`` (the same product), so the graph it
returns blocks for is the one the forms rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from torch import fx

from ..blocks import AttentionBlock, Block, FFNBlock, ResidualBlock, WeightRef
from ..cost import graph_flops, size_symbols
from ..graph_utils import common_prefix, module_path_of, number_nodes, to_nx
from ..linears import LinearSite, find_linears
from ..normalize import expand_fused_attention
from .attention import find_attention
from .canonical import linears_from_transposed_weights
from .ffn import find_ffns
from .residual import find_residuals

__all__ = ["BlockSet", "detect_blocks"]


@dataclass
class BlockSet:
    """Everything detection found on one graph."""

    gm: fx.GraphModule
    blocks: list[Block]
    linears: dict[fx.Node, LinearSite]
    total_flops: sympy.Expr
    symbols: dict[str, sympy.Symbol] = field(default_factory=dict)
    raw_symbols: set = field(default_factory=set)

    def of_kind(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]

    @property
    def ffn(self) -> list[FFNBlock]:
        return self.of_kind("ffn")  # type: ignore[return-value]

    @property
    def attention(self) -> list[AttentionBlock]:
        return self.of_kind("attention")  # type: ignore[return-value]

    @property
    def residual(self) -> list[ResidualBlock]:
        return self.of_kind("residual")  # type: ignore[return-value]

    def counts(self) -> dict[str, int]:
        return {k: len(self.of_kind(k)) for k in ("ffn", "attention", "residual")}


def _label(block: Block, names: dict[str, set[str]]) -> None:
    paths = [w.path.rsplit(".", 1)[0] for w in block.weights if w.path]
    if block.kind == "residual":
        paths = [n for n in block.extra.get("weight_paths", [])]
    name = common_prefix(paths) if paths else ""
    if not name and paths:
        name = paths[0] if paths[0] == paths[-1] else f"{paths[0]}..{paths[-1]}"
    if not name:
        name = common_prefix(module_path_of(n) for n in block.nodes) or block.output.name
    taken = names.setdefault(block.kind, set())
    base, i = name, 2
    while name in taken:
        name = f"{base}#{i}"
        i += 1
    taken.add(name)
    block.name = name


def detect_blocks(gm: fx.GraphModule) -> BlockSet:
    """Find the FFN, attention and residual blocks of a dynamo FX graph."""
    graph = gm.graph
    expand_fused_attention(gm)
    linears_from_transposed_weights(gm)
    number_nodes(graph)
    linears = find_linears(graph)
    ffns = find_ffns(linears)
    attns = find_attention(linears, graph)
    cores = {n for a in attns for n in a.core}
    residuals = find_residuals(graph, to_nx(graph), linears, cores)
    names: dict[str, set[str]] = {}
    for r in residuals:
        inside = set(r.nodes)
        r.extra["weight_paths"] = [s.module_path for n, s in linears.items() if n in inside]
        r.weights = [WeightRef(s.weight_name, (s.out_features, s.in_features))
                     for n, s in linears.items() if n in inside]
        r.contains = [b for b in ffns + attns if b.output in inside]  # type: ignore[misc]
    blocks: list[Block] = [*ffns, *attns, *residuals]
    for b in blocks:
        _label(b, names)
    for r in residuals:
        r.contains = [b.name for b in r.contains]  # type: ignore[union-attr]
    blocks.sort(key=lambda b: (b.output.meta.get("dyn_index", 0), b.kind))
    total = graph_flops(graph, linears)
    symbols = size_symbols(gm, set(sympy.sympify(total).free_symbols))
    if symbols:
        blocks_subs = {old: new for old, new in symbols.items()}
        for b in blocks:
            b.flops = sympy.sympify(b.flops).xreplace(blocks_subs)
        total = sympy.sympify(total).xreplace(blocks_subs)
    return BlockSet(gm=gm, blocks=blocks, linears=linears, total_flops=total,
                    symbols={str(v): v for v in symbols.values()},
                    raw_symbols=set(symbols))
