"""Graph queries shared by the passes: node kinds, shapes, parameters, networkx views.

Everything here reads a dynamo (torch-level) FX graph. Ops are classified by
what they compute (``linear``, ``pointwise``, ``view``...), never by the module
or model class that produced them.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from typing import Any

import networkx as nx
import sympy
import torch
import torch.nn.functional as F
from torch import fx

# ---------------------------------------------------------------------------
# Node values and shapes


def node_value(node: Any) -> Any:
    """The (fake) value a node produces, as recorded by dynamo or shape propagation."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta
    for key in ("val", "example_value"):
        if key in meta:
            return meta[key]
    return None


def tensor_value(node: Any) -> torch.Tensor | None:
    v = node_value(node)
    return v if isinstance(v, torch.Tensor) else None


def is_tensor(node: Any) -> bool:
    return tensor_value(node) is not None


def shape_of(node: Any) -> tuple | None:
    v = tensor_value(node)
    return None if v is None else tuple(v.shape)


def sym(x: Any) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def numel_expr(shape: Iterable[Any]) -> sympy.Expr:
    out = sympy.Integer(1)
    for d in shape:
        out = out * sym(d)
    return out


# ---------------------------------------------------------------------------
# Parameters

_TOKEN = re.compile(r"\.(\w+)|\['([^']*)'\]")
# Tokens of a source name that are no part of the module path: the containers, and
# ``__self__`` (a bound method's module, as a graph entered through ``model.forward``
# held by ``generate()`` names it), so every entry point names a parameter alike.
_CONTAINERS = {"_modules", "_parameters", "_buffers", "__self__"}


def _source_fqn(source_name: str) -> tuple[str, str]:
    """Parse a dynamo source name like L['self']._modules['fc']._parameters['weight'].

    Returns (kind, fqn) where kind is 'param', 'buffer' or ''.
    """
    kind = ("param" if "_parameters[" in source_name
            else "buffer" if "_buffers[" in source_name else "")
    parts = []
    body = source_name.split("]", 1)[1] if source_name.startswith("L[") else source_name
    for attr, key in _TOKEN.findall(body):
        token = attr or key
        if token in _CONTAINERS:
            continue
        parts.append(token)
    return kind, ".".join(parts)


def placeholder_info(node: fx.Node) -> tuple[str, str]:
    """(kind, fqn) of a placeholder: kind 'param', 'buffer' or 'input'."""
    if node.op == "get_attr":
        return "param", str(node.target)
    if node.op != "placeholder":
        return "", ""
    cached = node.meta.get("dyn_placeholder")
    if cached is not None:
        return cached
    grapharg = node.meta.get("grapharg")
    info = ("input", str(node.target))
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        kind, fqn = _source_fqn(grapharg.source.name)
        if kind:
            info = (kind, fqn)
        else:
            info = ("input", fqn or str(node.target))
    else:
        name = str(node.target)
        if "_parameters_" in name:
            info = ("param", name)
        elif "_buffers_" in name:
            info = ("buffer", name)
    node.meta["dyn_placeholder"] = info
    return info


def is_param(node: Any) -> bool:
    """A graph input or attribute that holds a trained parameter."""
    return isinstance(node, fx.Node) and placeholder_info(node)[0] == "param"


def matmul_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """The two multiplied operands of a matmul-like node, whatever its spelling:
    ``a @ b``, ``matmul``/``bmm``/``mm(a, b)``, ``baddbmm(bias, a, b)`` (the bias is not an
    operand) and two-operand ``einsum(eq, a, b)`` (or ``einsum(eq, [a, b])``); None
    otherwise."""
    if op_kind(node) != "matmul":
        return None
    args = node.args
    if node.target is torch.einsum:
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) \
            else list(args[1:])
        return (ops[0], ops[1]) if len(ops) == 2 else None
    if node.target is torch.baddbmm or (node.op == "call_method" and node.target == "baddbmm"):
        # baddbmm(bias, batch1, batch2) or bias.baddbmm(batch1=..., batch2=...)
        rest = list(args[1:3])
        for key in ("batch1", "batch2")[len(rest):]:
            if key in node.kwargs:
                rest.append(node.kwargs[key])
        return (rest[0], rest[1]) if len(rest) == 2 else None
    if node.op == "call_method":
        return (args[0], args[1]) if len(args) >= 2 else None
    return (args[0], args[1]) if len(args) >= 2 else None


def einsum_flops(node: fx.Node) -> Any:
    """2 x the product of every index's size for a two-operand ``einsum`` (a contraction:
    each output element sums over the indices that do not appear in the output), or None
    when the equation or the shapes are not at hand."""
    ops = matmul_operands(node)
    eq = node.args[0] if node.args else None
    if ops is None or not isinstance(eq, str) or "->" not in eq or "." in eq:
        return None
    ins = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, Any] = {}
    for letters, op in zip(ins, ops):
        shape = shape_of(op) if isinstance(op, fx.Node) else None
        if shape is None or len(shape) != len(letters):
            return None
        for c, n in zip(letters, shape):
            sizes.setdefault(c, sym(n))
    total: Any = 2
    for n in sizes.values():
        total = total * n
    return total


def is_weight_like(node: Any) -> bool:
    """A parameter, or a view/slice/cast of one (weights sliced out of a fused tensor)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if is_param(node):
            return True
        if op_kind(node) not in ("view", "getitem", "cast", "transpose"):
            return False
        node = node.args[0]
        seen += 1
    return False


def root_param(node: Any) -> fx.Node | None:
    while isinstance(node, fx.Node):
        if is_param(node):
            return node
        if op_kind(node) not in ("view", "getitem", "cast", "transpose"):
            return None
        node = node.args[0]
    return None


def param_name(node: Any) -> str:
    root = root_param(node)
    return placeholder_info(root)[1] if root is not None else ""


# ---------------------------------------------------------------------------
# Op kinds

_ACTIVATIONS = {
    F.gelu, F.relu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus,
    F.hardswish, F.hardsigmoid, F.relu6, F.sigmoid, F.tanh, F.hardtanh, F.glu,
    torch.relu, torch.sigmoid, torch.tanh, torch.erf, torch.exp, torch.nn.functional.logsigmoid,
    torch.clamp, torch.clip, torch.sin, torch.cos,
}
_ACT_METHODS = {"relu", "sigmoid", "tanh", "erf", "exp", "clamp", "clip", "sin", "cos",
                "relu_", "sigmoid_", "tanh_"}
_ARITH = {
    operator.add, operator.mul, operator.sub, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.mul, torch.sub, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt,
    torch.abs, torch.square, torch.where, torch.masked_fill, torch.maximum, torch.minimum,
}
_ARITH_METHODS = {"add", "mul", "sub", "div", "neg", "pow", "add_", "mul_", "sub_", "div_",
                  "maximum", "minimum",
                  "sqrt", "rsqrt", "abs", "square", "masked_fill", "masked_fill_"}
_VIEW_FUNCS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
_VIEW_METHODS = {"view", "reshape", "contiguous", "flatten", "unflatten", "squeeze",
                 "unsqueeze", "expand", "view_as", "reshape_as", "expand_as", "clone"}
_TRANSPOSE_FUNCS = {torch.transpose, torch.permute, torch.t}
_TRANSPOSE_METHODS = {"transpose", "permute", "t", "mT"}
_TRANSPOSE_ATTRS = {"T", "mT", "H", "mH"}  # ``w.T`` traces as getattr(w, "T")
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}
_DROPOUT = {F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
_SPLIT_FUNCS = {torch.split, torch.chunk, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "unbind"}
_SOFTMAX = {F.softmax, torch.softmax, torch.nn.functional.softmax}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm}
_REDUCTIONS_METHODS = {"mean", "sum", "var", "std", "amax", "max", "min", "norm"}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}

try:
    _LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
except AttributeError:  # pragma: no cover
    _LINEAR_FUNCS = {F.linear}


def op_kind(node: fx.Node) -> str:
    """A coarse, architecture-free kind for a node.

    One of: placeholder, output, param, linear, addmm, matmul, sdpa, softmax,
    activation, arith, view, transpose, cast, dropout, split, getitem, cat,
    norm, reduction, embedding, conv, other.
    """
    if node.op in ("placeholder", "get_attr"):
        return "param" if is_param(node) else node.op
    if node.op == "output":
        return "output"
    t = node.target
    if node.op == "call_method":
        if t in _ACT_METHODS:
            return "activation"
        if t == "pow":
            return "activation" if _nonlinear_pow(node) else "arith"
        if t in _ARITH_METHODS:
            return "arith"
        if t in _VIEW_METHODS:
            return "view"
        if t in _TRANSPOSE_METHODS:
            return "transpose"
        if t in _CAST_METHODS:
            return "cast"
        if t in _SPLIT_METHODS:
            return "split"
        if t == "softmax":
            return "softmax"
        if t in ("matmul", "bmm", "mm", "baddbmm"):
            return "matmul"
        if t in ("max", "min") and _binary_elementwise(node):
            return "arith"
        if t in _REDUCTIONS_METHODS:
            return "reduction"
        return "other"
    if node.op != "call_function":
        return "other"
    if t in _LINEAR_FUNCS:
        return "linear"
    if t is torch.addmm:
        return "addmm"
    if t in _MATMUL:
        return "matmul"
    if t is F.scaled_dot_product_attention:
        return "sdpa"
    if t in _SOFTMAX:
        return "softmax"
    if t in (torch.pow, operator.pow):
        return "activation" if _nonlinear_pow(node) else "arith"
    if t in _ACTIVATIONS:
        return "activation"
    if t in _ARITH:
        return "arith"
    if t in _VIEW_FUNCS:
        return "view"
    if t in _TRANSPOSE_FUNCS:
        return "transpose"
    if t in _DROPOUT:
        return "dropout"
    if t in _SPLIT_FUNCS:
        return "split"
    if t is operator.getitem:
        return "getitem"
    if t is getattr and len(node.args) == 2 and node.args[1] in _TRANSPOSE_ATTRS:
        return "transpose"
    if t in _CAT:
        return "cat"
    if t in (F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm, F.instance_norm,
             torch.layer_norm):
        return "norm"
    if t in (torch.max, torch.min) and _binary_elementwise(node):
        return "arith"
    if t in (torch.mean, torch.sum, torch.var, torch.std, torch.amax, torch.max, torch.min):
        return "reduction"
    if t is F.embedding:
        return "embedding"
    if t in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
        return "conv"
    return "other"


def _binary_elementwise(node: fx.Node) -> bool:
    """``max(a, b)`` / ``min(a, b)`` of two tensors (elementwise), not a reduction over a dim."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return isinstance(other, fx.Node) and is_tensor(other)


def _nonlinear_pow(node: fx.Node) -> bool:
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    return isinstance(exponent, (int, float)) and exponent not in (1, 1.0)


POINTWISE = {"activation", "arith", "cast", "dropout"}
SHAPE_ONLY = {"view", "transpose", "cast", "dropout", "getitem", "split"}


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Direct node inputs that produce tensors (or tuples of tensors, for getitem)."""
    out = []
    for a in node.all_input_nodes:
        if is_tensor(a) or op_kind(a) == "split" or isinstance(node_value(a), (tuple, list)):
            out.append(a)
    return out


# ---------------------------------------------------------------------------
# networkx view


def to_nx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph of an FX graph as a networkx DiGraph over fx.Nodes."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def module_path_of(node: fx.Node) -> str:
    """The innermost module path dynamo recorded for a node ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    if path.startswith("L['self']"):
        path = path[len("L['self']"):]
    elif path.startswith("L['fn']"):
        path = path[len("L['fn']"):]
    parts = [a or k for a, k in _TOKEN.findall(path) if (a or k) not in _CONTAINERS]
    return ".".join(parts) if parts else path


def common_prefix(paths: Iterable[str]) -> str:
    """Longest common dotted prefix, e.g. a.b.c and a.b.d -> a.b."""
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    out = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            out.append(parts[0])
        else:
            break
    return ".".join(out)


def number_nodes(graph: fx.Graph) -> None:
    """Record each node's position in graph order (read back by position())."""
    for i, n in enumerate(graph.nodes):
        n.meta["dyn_index"] = i


def position(node: fx.Node) -> int:
    return node.meta.get("dyn_index", 0)


def mutates(node: fx.Node) -> bool:
    """True for a node that writes into one of its inputs (``x.masked_fill_(...)``,
    ``torch.relu_(x)``, an op whose schema marks a mutated argument): its result may be
    unused, yet it must stay."""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def eliminate_dead_code(graph: fx.Graph) -> None:
    """``graph.eliminate_dead_code()`` that keeps in-place writes whose result is unused
    (FX's default drops ``x.masked_fill_(m, 0)`` when nothing reads its return value)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
