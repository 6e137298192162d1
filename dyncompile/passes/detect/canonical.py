"""Linears written as ``x @ W.T`` (optionally ``+ b``) become ``F.linear(x, W, b)``.

Some models keep an ``nn.Linear``-shaped weight ``W`` (out, in) and multiply by its
transpose themselves (Falcon's ``hidden_states @ self.weight.T``). The product is the one
``F.linear`` computes; written as a linear, the site's weight is the parameter itself, in
the layout every form expects of a linear, instead of a transposed view of it.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..graph_utils import is_param, is_weight_like, matmul_operands, op_kind, shape_of

_ADDS = {operator.add, torch.add, "add"}


def _transposed_param(w: object) -> fx.Node | None:
    """The 2-D parameter ``P`` when ``w`` is ``P.T``, ``P.mT``, ``P.t()`` or a transpose of
    its two dims."""
    if not isinstance(w, fx.Node) or op_kind(w) != "transpose" or not w.args:
        return None
    p = w.args[0]
    if not (is_param(p) and shape_of(p) is not None and len(shape_of(p)) == 2):
        return None
    if w.target in (getattr, "t", torch.t):
        return p
    if w.target in ("transpose", torch.transpose):
        dims = [d % 2 for d in w.args[1:3] if isinstance(d, int)]
        return p if sorted(dims) == [0, 1] else None
    if w.target in ("permute", torch.permute):
        dims = w.args[1] if len(w.args) == 2 and isinstance(w.args[1], (list, tuple)) \
            else w.args[1:]
        return p if [d % 2 for d in dims] == [1, 0] else None
    return None


def _bias_of(mm: fx.Node, out_features: int) -> tuple[fx.Node, fx.Node] | None:
    """``(add, b)`` when the product's only use is ``+ b`` with a 1-D bias parameter."""
    users = list(mm.users)
    if len(users) != 1:
        return None
    add = users[0]
    if op_kind(add) != "arith" or add.target not in _ADDS or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is mm else add.args[0]
    if is_weight_like(other) and shape_of(other) == (out_features,):
        return add, other
    return None


def linears_from_transposed_weights(gm: fx.GraphModule) -> int:
    """Rewrite each ``x @ W.T`` (+ ``b``) on a parameter ``W`` into ``F.linear``; returns the
    number rewritten."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        if op_kind(node) != "matmul" or node.target not in (operator.matmul, torch.matmul,
                                                            "matmul"):
            continue
        ops = matmul_operands(node)
        if ops is None or len(node.args) != 2 or node.kwargs:
            continue
        x, w = ops
        p = _transposed_param(w)
        if p is None or not isinstance(x, fx.Node) or is_weight_like(x):
            continue
        xshape = shape_of(x)
        if not xshape or xshape[-1] != shape_of(p)[1]:
            continue
        bias = _bias_of(node, int(shape_of(p)[0]))
        end = bias[0] if bias else node
        with graph.inserting_before(end):
            args = (x, p, bias[1]) if bias else (x, p)
            linear = graph.call_function(torch._C._nn.linear, args)
        linear.meta = dict(end.meta)
        end.replace_all_uses_with(linear)
        graph.erase_node(end)
        if bias:
            graph.erase_node(node)
        if not w.users:
            graph.erase_node(w)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
