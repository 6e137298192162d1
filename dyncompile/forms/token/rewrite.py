"""Form ``token``: the pass that cuts the residual stream for token merging.

The pass takes the main residual stream (passes/stream.py), cuts the graph at
each residual block's input where the cut is clean, and makes one piece per
block, plus the head. A piece holding attention gets a last input, the
proportional-attention bias ``log(size)`` [rows, 1, 1, tokens], added to its
attention's mask (SDPA) or scores (softmax attention); the merge after it
matches tokens on the stream leaving it (or on that attention's keys). The
token count must be traced as a symbol (``optimize()`` marks it), so each
compiled piece serves every count.

Left dense, with the reason logged: causal attention (a token's merge would
depend on later tokens), a token count traced as a constant, and graphs where a
value other than the stream and the per-token inputs crosses the blocks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import sympy
import torch
from torch import fx

from ...core.options import choice
from ...core.registry import register_form
from ...passes.attention_masks import hoist_mask_conversions
from ...passes.base import Pass, PassContext
from ...passes.graph_utils import op_kind, sym, tensor_value, to_nx
from ...passes.splice import linear_cost
from ...passes.stream import clean_cuts, final_state, stream_chain
from ...program.pieces import Piece, build_piece, cut_at
from ...program.rows import node_example
from .program import TokenGraph, TokenRunner


@dataclass(frozen=True)
class TokenOptions:
    """``match_on``: what tokens are matched on, the stream after the attention block
    (the values that merge; default) or that attention's keys (ToMe's choice).
    ``protect_first``: the first token (a classifier's or pooler's token) never merges."""

    match_on: str = choice("stream", "keys")
    protect_first: bool = choice(True, False)


class TokenRuntime:
    """Run-time data of the form: nothing to calibrate (the schedule follows from the
    pieces' costs). The last call that merged leaves ``last_tokens`` (tokens entering
    each piece), ``last_index`` ([rows, tokens]: each original token's final position)
    and ``last_rep`` (each final position's kept original token)."""

    calibrated = True

    def __init__(self) -> None:
        self.last_tokens: list[int] = []
        self.last_index: torch.Tensor | None = None
        self.last_rep: torch.Tensor | None = None
        self.graphs: list[TokenGraph] = []

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                model: Any) -> None:
        return None


_COMPARE = {operator.lt, operator.le, operator.gt, operator.ge, torch.lt, torch.le,
            torch.gt, torch.ge}
_TRI = {torch.tril, torch.triu, "tril", "triu", "tril_", "triu_"}


def is_causal(gm: fx.GraphModule) -> bool:
    """Whether an attention of the graph is causal: an SDPA call with ``is_causal``, a
    triangular mask (``tril``/``triu``), or a comparison between two position ranges."""
    g = to_nx(gm.graph)
    aranges = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.arange}
    for n in gm.graph.nodes:
        if op_kind(n) == "sdpa" and (n.kwargs.get("is_causal") or
                                     (len(n.args) > 5 and n.args[5] is True)):
            return True
        if n.target in _TRI:
            return True
        if n.target in _COMPARE and len(n.args) == 2 and all(
                isinstance(a, fx.Node) for a in n.args):
            sides = [(nx.ancestors(g, a) | {a}) & aranges for a in n.args]
            if all(sides) and sides[0] != sides[1]:
                return True
    return False


def _mask_node(n: fx.Node) -> Any:
    return n.kwargs["attn_mask"] if "attn_mask" in n.kwargs else (
        n.args[3] if len(n.args) > 3 else None)


def _bias_piece(piece: Piece) -> torch.dtype | None:
    """Give ``piece`` a last input, the bias, added to each attention's mask or scores;
    returns the bias dtype (None: no attention to bias, the piece is unchanged)."""
    graph = piece.module.graph
    cores = [n for n in graph.nodes if op_kind(n) in ("sdpa", "softmax")]
    if not cores:
        return None
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        bias = graph.placeholder("token_bias")
    dtype = None
    for n in cores:
        if op_kind(n) == "sdpa":
            mask = _mask_node(n)
            q = tensor_value(n.args[0])
            m = tensor_value(mask) if isinstance(mask, fx.Node) else None
            dtype = m.dtype if m is not None and m.is_floating_point() else (
                q.dtype if q is not None else torch.float32)
            with graph.inserting_before(n):
                if mask is None:
                    new = bias
                elif m is not None and m.dtype == torch.bool:
                    new = graph.call_function(torch.where, (mask, bias, float("-inf")))
                else:
                    new = graph.call_function(operator.add, (mask, bias))
            if "attn_mask" in n.kwargs or len(n.args) <= 3:
                n.kwargs = {**n.kwargs, "attn_mask": new}
            else:
                n.args = (*n.args[:3], new, *n.args[4:])
        else:
            scores = n.args[0] if n.args else n.kwargs.get("input")
            s = tensor_value(scores) if isinstance(scores, fx.Node) else None
            dtype = s.dtype if s is not None else torch.float32
            with graph.inserting_before(n):
                new = graph.call_function(operator.add, (scores, bias))
            n.replace_input_with(scores, new)
    piece.module.recompile()
    return dtype


@register_form
class TokenForm(Pass):
    """Merge similar tokens after each attention block; unmerge them before the head."""

    name = "token"
    stage = 80
    Options = TokenOptions
    looks_for = ("a non-causal residual stream through two or more blocks whose token "
                 "count is traced as a symbol")
    runtime = TokenRuntime
    dynamic_tokens = True
    # Applied when named: the planner does not mix it with the other forms yet.
    automatic = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        assert ctx.blocks is not None and ctx.state is not None
        if ctx.program is not None:
            ctx.log.append("token: left dense (another form already runs this graph)")
            return []
        graph = self.plan(gm, ctx)
        if isinstance(graph, str):
            ctx.log.append(f"token: left dense ({graph})")
            return []
        runtime = ctx.state.form(self.name, TokenRuntime)
        runtime.graphs.append(graph)
        ctx.program = TokenRunner(graph, runtime, ctx.state)
        gm.meta["dyn_token_graph"] = graph
        merges = [j for j, k in enumerate(graph.keys) if k is not None]
        ctx.log.append(f"token: {len(graph.pieces)} pieces, merging after {len(merges)}")
        return [f"merge after block {j}" for j in merges]

    def plan(self, gm: fx.GraphModule, ctx: PassContext) -> TokenGraph | str:
        """Cut ``gm`` for token merging, or say why it cannot be."""
        blocks = ctx.blocks
        assert blocks is not None
        opts: TokenOptions = ctx.config.options_for(self.name)
        g = to_nx(gm.graph)
        chain = stream_chain(blocks.residual, g)
        if len(chain) < 2:
            return f"{len(chain)} residual block(s) on the stream"
        if is_causal(gm):
            return "causal attention: merging would let later tokens change earlier ones"
        hoist_mask_conversions(gm)
        g = to_nx(gm.graph)
        final = final_state(chain[-2].add, chain[-1].skip, chain[-1].add, g)
        if final is None:
            return "the stream between blocks is not a path"
        stream = [r.skip for r in chain] + [final]
        ex = node_example(stream[0])
        if not isinstance(ex, torch.Tensor) or ex.dim() < 3:
            return "the stream is not [rows, tokens, width]"
        tokens = sym(ex.shape[1])
        if not isinstance(tokens, sympy.Symbol):
            return ("the token count was traced as a constant (optimize() traces it as a "
                    "symbol; with torch.compile pass dynamic=True)")
        good = clean_cuts(gm, stream)
        stream = [stream[0], *[stream[k] for k in good], stream[-1]]
        if len(stream) < 3:
            return "no block boundary cuts the graph cleanly"
        nodes = list(gm.graph.nodes)
        raw = gm.graph.output_node().args[0]
        outputs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        seg_nodes, head_nodes, handed_on = cut_at(gm, stream)
        body = [n for ns in seg_nodes for n in ns] + head_nodes
        where = {n: j for j, ns in enumerate(seg_nodes) for n in ns}
        # Only the stream and values made before the first block may cross into later
        # blocks or the head (merged tokens would not line up with anything else).
        for n, j in where.items():
            if j == 0 or n is stream[j + 1]:
                continue
            late = [u for u in n.users if u.op == "output" or where.get(u, -1) != j]
            if late:
                return f"{n.name}, made inside block {j}, is read outside it"
        attention = [a for a in blocks.attention if not a.cross]
        keys: list[fx.Node | None] = []
        for j, ns in enumerate(seg_nodes):
            inside = set(ns)
            found = [a for a in attention if a.core and a.core[0] in inside]
            if not found:
                keys.append(None)
                continue
            a = found[-1]
            k = a.k.output if (opts.match_on == "keys" and a.k is not None and
                               not a.fused_qkv and a.k.output in inside) else stream[j + 1]
            keys.append(k)
        if not any(keys):
            return "no attention on the stream"
        pieces = []
        for j, ns in enumerate(seg_nodes):
            wanted = list(handed_on[j])
            if keys[j] is not None and keys[j] not in wanted:
                wanted.append(keys[j])
            pieces.append(build_piece(gm, f"block{j}", ns, wanted))
        head_out = [o for o in outputs if isinstance(o, fx.Node) and
                    (o in set(head_nodes) or o is stream[-1] or o not in where)]
        head = build_piece(gm, "head", head_nodes, head_out)
        whole = build_piece(gm, "whole", body, [o for o in outputs if isinstance(o, fx.Node)])
        # Per-token inputs of each piece after the first, and sizes read from the count.
        token_inputs: list[dict[fx.Node, list[int]]] = []
        size_ints: list[dict[fx.Node, sympy.Expr]] = []
        for j, p in enumerate(pieces):
            dims_of: dict[fx.Node, list[int]] = {}
            ints: dict[fx.Node, sympy.Expr] = {}
            for u in p.inputs:
                if u is stream[j]:
                    continue
                v = node_example(u)
                if isinstance(v, torch.SymInt):
                    e = sym(v)
                    if tokens in e.free_symbols:
                        ints[u] = e
                    continue
                if not isinstance(v, torch.Tensor):
                    continue
                dims = [d for d, s in enumerate(v.shape) if sym(s) == tokens]
                other = [d for d, s in enumerate(v.shape)
                         if d not in dims and tokens in sym(s).free_symbols]
                if j and (other or 0 in dims):
                    return f"{u.name} is sized by the token count in a way merging cannot follow"
                if dims:
                    dims_of[u] = dims
            token_inputs.append(dims_of)
            size_ints.append(ints)
        # The masks that keep padding and real tokens apart: each SDPA call's mask.
        masks = []
        for p in pieces[1:]:
            for u in p.inputs:
                if any(op_kind(w) == "sdpa" and _mask_node(w) is u for w in u.users):
                    masks.append(u)
        masks = list(dict.fromkeys(masks))
        biased, bias_dtype = [], {}
        for j, p in enumerate(pieces):
            dt = _bias_piece(p)
            biased.append(dt is not None)
            if dt is not None:
                bias_dtype[j] = dt
        linears = blocks.linears
        per_token = [linear_cost(ns, linears) for ns in seg_nodes]
        quadratic = [sum(4.0 * a.q.out_features for a in attention
                         if a.core and a.core[0] in set(ns) and a.q is not None)
                     for ns in seg_nodes]
        return TokenGraph(
            placeholders=[n for n in nodes if n.op == "placeholder"], outputs=outputs,
            stream=stream, pieces=pieces, head=head, whole=whole, keys=keys, biased=biased,
            token_inputs=token_inputs, size_ints=size_ints, masks=masks,
            tokens_symbol=tokens, linear_cost=per_token, quadratic_cost=quadratic,
            head_cost=linear_cost(head_nodes, linears), protect_first=opts.protect_first,
            bias_dtype=bias_dtype)
