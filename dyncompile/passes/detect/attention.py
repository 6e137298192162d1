"""Attention matcher: projections -> SDPA, or scores = f(q, k) -> softmax -> weights @ v,
-> output projection.

The core is found from the data flow, not the op's spelling: the two products are any
matmul-like node (``@``, ``matmul``, ``bmm``, ``baddbmm`` onto a bias such as ALiBi's,
two-operand ``einsum``), and the scores may pass through pointwise ops (scale, bias,
mask, a ``tanh`` soft cap) on their way to the softmax."""

from __future__ import annotations

import sympy
from torch import fx

from ..blocks import AttentionBlock, WeightRef
from ..graph_utils import (
    is_param,
    is_weight_like,
    matmul_operands,
    numel_expr,
    op_kind,
    position,
    shape_of,
)
from ..linears import LinearSite

# Ops between a projection and the attention core: reshapes, head splits,
# scaling, rotary embeddings (mul/neg/cat of halves), KV-cache concatenation.
_TO_CORE = {"view", "transpose", "cast", "getitem", "split", "arith", "cat", "dropout",
            "activation"}
# Ops between the core and the output projection: reshapes only.
_FROM_CORE = {"view", "transpose", "cast", "dropout", "getitem"}
_SCORES = {"arith", "cast", "view", "transpose", "getitem", "other", "activation"}
_MAX_WALK = 160


def _is_core_matmul(n: fx.Node) -> bool:
    ops = matmul_operands(n)
    return ops is not None and not any(is_weight_like(a) for a in ops)


def _projections(start: fx.Node, by_output: dict[fx.Node, LinearSite]) -> list[LinearSite]:
    """Linear sites reached walking back from an attention operand."""
    found: list[LinearSite] = []
    seen: set[fx.Node] = set()
    stack = [start]
    while stack and len(seen) < _MAX_WALK:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in by_output:
            if by_output[n] not in found:
                found.append(by_output[n])
            continue
        if op_kind(n) not in _TO_CORE:
            continue
        for inp in n.all_input_nodes:
            if not is_param(inp):
                stack.append(inp)
    return found


def _output_projection(start: fx.Node, by_input: dict[fx.Node, LinearSite]) -> LinearSite | None:
    n = start
    for _ in range(12):
        if n in by_input:
            return by_input[n]
        users = list(n.users)
        if len(users) != 1:
            # tuple outputs (getitem 0 of an attention that also returns weights)
            users = [u for u in users if op_kind(u) in _FROM_CORE or u in by_input]
            if len(users) != 1:
                return None
        n = users[0]
        if n in by_input:
            return by_input[n]
        if op_kind(n) not in _FROM_CORE:
            return None
    return None


def _softmax_core(sm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """For a softmax node, the scores matmul (q @ k^T) before it and the matmul with v after."""
    m1, seen, stack = None, set(), [sm.args[0]]
    while stack and len(seen) < _MAX_WALK:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if _is_core_matmul(n):
            if m1 is not None and m1 is not n:
                return None
            m1 = n
            continue
        if op_kind(n) in _SCORES and n.op != "placeholder":
            stack.extend(a for a in n.all_input_nodes if not is_param(a))
    if m1 is None:
        return None
    n = sm
    for _ in range(6):
        users = list(n.users)
        if len(users) != 1:
            mm = [u for u in users if _is_core_matmul(u) and matmul_operands(u)[0] is n]
            if len(mm) == 1:
                return m1, mm[0]
            return None
        u = users[0]
        if _is_core_matmul(u) and matmul_operands(u)[0] is n:
            return m1, u
        if op_kind(u) not in ("dropout", "cast", "view"):
            return None
        n = u
    return None


def find_attention(linears: dict[fx.Node, LinearSite], graph: fx.Graph) -> list[AttentionBlock]:
    by_output: dict[fx.Node, LinearSite] = {}
    by_input: dict[fx.Node, LinearSite] = {}
    for site in linears.values():
        by_output[site.output] = site
        by_output[site.node] = site
        by_input[site.x] = site
    out = []
    for node in graph.nodes:
        kind = op_kind(node)
        if kind == "sdpa":
            q_op, k_op, v_op = node.args[:3]
            core, core_out = [node], node
        elif kind == "softmax":
            pair = _softmax_core(node)
            if pair is None:
                continue
            m1, m2 = pair
            (q_op, k_op), v_op = matmul_operands(m1), matmul_operands(m2)[1]
            core, core_out = [m1, node, m2], m2
        else:
            continue
        block = _make_block(q_op, k_op, v_op, core, core_out, by_output, by_input)
        if block is not None:
            out.append(block)
    return out


def _make_block(q_op, k_op, v_op, core, core_out, by_output, by_input) -> AttentionBlock | None:
    qs = _projections(q_op, by_output)
    ks = _projections(k_op, by_output)
    vs = _projections(v_op, by_output)
    o = _output_projection(core_out, by_input)
    if not qs or o is None:
        return None
    q = qs[0]
    k = ks[0] if ks else None
    v = vs[0] if vs else None
    sites = list(dict.fromkeys([s for s in (q, k, v, o) if s is not None]))
    cross = k is not None and k.logical_input is not q.logical_input
    qshape, kshape = shape_of(q_op), shape_of(k_op)
    core_flops = sympy.Integer(0)
    heads = None
    if qshape and kshape and len(qshape) >= 3:
        # q: (..., Lq, D), k: (..., Lk, D) or k^T: (..., D, Lk)
        lk = kshape[-2] if kshape[-1] == qshape[-1] else kshape[-1]
        core_flops = 4 * numel_expr(qshape) * numel_expr([lk])
        if len(qshape) == 4:
            heads = int(qshape[1]) if not hasattr(qshape[1], "node") else None
    flops = sum((s.flops() for s in sites), sympy.Integer(0)) + core_flops
    nodes = _between(sites, o)
    return AttentionBlock(
        kind="attention", name="", nodes=nodes,
        weights=[WeightRef(s.weight_name, (s.out_features, s.in_features)) for s in sites],
        flops=flops, weight_bytes=sum(s.weight_bytes() for s in sites), output=o.output,
        q=q, k=k, v=v, o=o, core=core, cross=cross,
        fused_qkv=k is q and v is q, heads=heads,
    )


def _between(sites: list[LinearSite], o: LinearSite) -> list[fx.Node]:
    """Nodes from the projections to the output projection (inclusive)."""
    starts = [s.node for s in sites if s is not o]
    end = o.output
    fwd: set[fx.Node] = set()
    stack = list(starts)
    lo = min(position(s) for s in starts) if starts else 0
    hi = position(end)
    while stack:
        n = stack.pop()
        if n in fwd or position(n) > hi:
            continue
        fwd.add(n)
        stack.extend(n.users)
    back: set[fx.Node] = set()
    stack = [end]
    while stack:
        n = stack.pop()
        if n in back or position(n) < lo:
            continue
        back.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(fwd & back, key=position)
