"""Convert each boolean attention mask to its additive form once, not once per layer.

``scaled_dot_product_attention`` turns a boolean ``attn_mask`` into an additive one
(0 where attending, -inf elsewhere, in the query's dtype) on every call. In one
compiled graph Inductor computes that conversion once for all layers; in a graph
cut into per-layer pieces (early exit) every piece converts the mask again, a
parallel kernel per layer. This rewrite inserts the conversion right after the
mask is made and hands every attention call the additive mask: the same values,
so the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .graph_utils import tensor_value


def _mask_arg(node: fx.Node) -> tuple[str | int, object]:
    if "attn_mask" in node.kwargs:
        return "attn_mask", node.kwargs["attn_mask"]
    return 3, node.args[3] if len(node.args) > 3 else None


def hoist_mask_conversions(gm: fx.GraphModule) -> int:
    """Give every attention call with a boolean mask the mask's additive form, made once
    per (mask, dtype) right after the mask; returns how many calls were rewired."""
    graph = gm.graph
    made: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    rewired = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        where, mask = _mask_arg(node)
        q = tensor_value(node.args[0]) if node.args else None
        m = tensor_value(mask) if isinstance(mask, fx.Node) else None
        if q is None or m is None or m.dtype != torch.bool or not q.is_floating_point():
            continue
        assert isinstance(mask, fx.Node)
        key = (mask, q.dtype)
        if key not in made:
            fake = getattr(m, "fake_mode", None)
            if fake is None:
                continue
            with fake:  # the three nodes' values, on the graph's fake tensors
                zeros_v = torch.zeros_like(m, dtype=q.dtype)
                keep_v = torch.logical_not(m)
                add_v = torch.masked_fill(zeros_v, keep_v, float("-inf"))
            anchor = mask
            if mask.op == "placeholder":  # after every placeholder
                anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(anchor):
                zeros = graph.call_function(torch.zeros_like, (mask,), {"dtype": q.dtype})
            with graph.inserting_after(zeros):
                keep = graph.call_function(torch.logical_not, (mask,))
            with graph.inserting_after(keep):
                add = graph.call_function(torch.masked_fill, (zeros, keep, float("-inf")))
            zeros.meta["example_value"] = zeros_v
            keep.meta["example_value"] = keep_v
            add.meta["example_value"] = add_v
            made[key] = add
        if isinstance(where, str):
            node.update_kwarg(where, made[key])
        else:
            node.update_arg(where, made[key])
        rewired += 1
    if rewired:
        graph.lint()
        gm.recompile()
    return rewired
