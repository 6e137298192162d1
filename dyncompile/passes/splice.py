"""Small graph edits the forms share: where a linear's value is, and the GLU product."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .blocks import FFNBlock
from .graph_utils import op_kind
from .linears import LinearSite

_MUL = (operator.mul, torch.mul, torch.Tensor.mul)
_META = ("val", "example_value", "nn_module_stack", "stack_trace")


def replaced_node(site: LinearSite) -> fx.Node:
    """The node whose value a rewrite replaces (x @ W + b: the add carries the bias)."""
    if op_kind(site.node) == "matmul" and site.output is not site.node:
        return site.output
    return site.node


#: ``node.meta`` key: FLOPs per row of the dense linears a form's op replaced (so a later
#: form's cost model still counts the work the op stands for).
LINEAR_FLOPS = "dyn_linear_flops"


def linear_cost(nodes: list[fx.Node], linears: dict[fx.Node, LinearSite]) -> float:
    """FLOPs per token of the linears among ``nodes``: found linears (2 * in * out) and
    ops a form spliced in (their ``LINEAR_FLOPS`` meta)."""
    return float(sum(2 * linears[n].in_features * linears[n].out_features if n in linears
                     else n.meta.get(LINEAR_FLOPS, 0.0) for n in nodes))


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst`` the value and provenance metadata of the node it replaces."""
    dst.meta.update({k: v for k, v in src.meta.items() if k in _META})


def glu_product(block: FFNBlock) -> tuple[LinearSite, fx.Node] | None:
    """(up site, the other factor) when the down projection reads ``a * up(x)`` directly.

    None unless the block is a two-projection GLU whose down input is that product.
    """
    if not block.gated or block.fused_gate_up or block.gate is None or len(block.up) != 2:
        return None
    up = next(u for u in block.up if u is not block.gate)
    mul = block.down.x if block.down is not None else None
    if mul is None or mul.target not in _MUL:
        return None
    args = [a for a in mul.args if isinstance(a, fx.Node)]
    if len(args) != 2 or up.output not in args:
        return None
    return up, args[0] if args[1] is up.output else args[1]
