"""FFN matcher: linear -> pointwise region with a nonlinearity -> linear."""

from __future__ import annotations

from torch import fx

from ..blocks import FFNBlock, WeightRef
from ..graph_utils import is_param, is_tensor, op_kind, position, shape_of, tensor_inputs
from ..linears import LinearSite

# Ops allowed between the up and down projections (pointwise math, casts,
# views, dropout, and the split of a fused gate/up projection).
_REGION = {"activation", "arith", "cast", "dropout", "view", "getitem", "split"}
_MAX_REGION = 96


def _walk_region(start: fx.Node, by_output: dict[fx.Node, LinearSite]):
    region: set[fx.Node] = set()
    frontier: dict[fx.Node, LinearSite] = {}
    stack = [start]
    while stack:
        n = stack.pop()
        if n in region or n in frontier:
            continue
        if n in by_output:
            frontier[n] = by_output[n]
            continue
        kind = op_kind(n)
        if kind not in _REGION:
            return None
        region.add(n)
        if len(region) > _MAX_REGION:
            return None
        for inp in n.all_input_nodes:
            if is_param(inp) or op_kind(inp) == "get_attr":
                continue
            if not is_tensor(inp) and op_kind(inp) != "split":
                continue  # sizes (SymInts) feeding a view
            if inp.op == "placeholder":
                return None
            stack.append(inp)
    return region, frontier


def match_ffn(down: LinearSite, by_output: dict[fx.Node, LinearSite]) -> FFNBlock | None:
    walked = _walk_region(down.x, by_output)
    if walked is None:
        return None
    region, frontier = walked
    ups = list(dict.fromkeys(frontier.values()))
    if not 1 <= len(ups) <= 2:
        return None
    acts = [n for n in region if op_kind(n) == "activation"]
    if not acts:
        return None
    # Both up projections read the same activation.
    inputs = {u.logical_input for u in ups}
    if len(inputs) != 1:
        return None
    hidden = down.in_features
    fused = len(ups) == 1 and ups[0].out_features == 2 * hidden and any(
        op_kind(n) in ("split", "getitem") for n in region)
    if len(ups) == 1 and not fused and ups[0].out_features != hidden:
        return None
    if len(ups) == 2 and any(u.out_features != hidden for u in ups):
        return None
    # Closed region: nothing outside reads the hidden activations.
    allowed = region | {down.node, down.x}
    for u in ups:
        allowed |= {u.node, u.output}
    for n in list(region) + [u.output for u in ups] + [u.node for u in ups]:
        for user in n.users:
            if user not in allowed:
                return None
    gate = None
    if len(ups) == 2:
        gate = next((u for u in ups if _reaches_activation(u.output, region)), ups[0])
    members = region | {u.node for u in ups} | {u.output for u in ups}
    nodes = sorted(members | {down.node, down.output}, key=position)
    sites = ups + [down]
    weights = [WeightRef(s.weight_name, (s.out_features, s.in_features)) for s in sites]
    flops = sum((s.flops() for s in sites), 0)
    return FFNBlock(
        kind="ffn", name="", nodes=nodes, weights=weights, flops=flops,
        weight_bytes=sum(s.weight_bytes() for s in sites), output=down.output,
        up=ups, down=down, gate=gate, hidden=hidden, gated=len(ups) == 2 or fused,
        fused_gate_up=fused, activation=sorted(acts, key=position), input=ups[0].logical_input,
    )


def _reaches_activation(start: fx.Node, region: set[fx.Node]) -> bool:
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in region and u not in seen:
                if op_kind(u) == "activation":
                    return True
                if op_kind(u) in ("arith",) and sum(is_tensor(a) for a in tensor_inputs(u)) > 1:
                    continue  # reached the gate * up product without an activation
                seen.add(u)
                stack.append(u)
    return False


def find_ffns(linears: dict[fx.Node, LinearSite]) -> list[FFNBlock]:
    by_output: dict[fx.Node, LinearSite] = {}
    for site in linears.values():
        by_output[site.output] = site
        by_output[site.node] = site
    out = []
    used: set[fx.Node] = set()
    for site in linears.values():
        if shape_of(site.x) is None:
            continue
        block = match_ffn(site, by_output)
        if block is None or any(u.node in used for u in block.up):
            continue
        used.update(u.node for u in block.up)
        out.append(block)
    return out
