"""Call a compiled piece's generated code without the wrappers around it.

``compile_fx`` returns Inductor's generated ``call`` wrapped in dynamo's and
AOTAutograd's runtime wrappers (autograd, input mutations, aliased outputs,
eval-frame state). For a pure inference piece none of them does anything, yet
together they cost about 70 us per call on the 2-core CPU: on one 128-token
sentence, cut into seven pieces, that is 2-3% of the forward.

:class:`DirectCall` keeps the wrapped callable and, for a piece whose graph
mutates nothing, finds the generated code inside it. The first call without
grad runs both and compares every output (shape, strides, dtype, values); only
if they agree do later calls without grad go straight to the generated code.
With grad enabled, or when the generated code cannot be found or disagrees,
every call goes through the wrappers as before.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

_MAX_DEPTH = 8
# operator.iadd and the like, and item assignment: the operator module's writes.
_OPERATOR_WRITES = {getattr(operator, n) for n in dir(operator)
                    if n.startswith("i") and n[1:] in dir(operator)} | {operator.setitem,
                                                                         operator.delitem}


def output_code(fn: Any) -> Callable[[list[Any]], Any] | None:
    """The generated ``call(args: list)`` inside ``compile_fx``'s result, or None."""
    seen: set[int] = set()
    frontier = [fn]
    for _ in range(_MAX_DEPTH):
        nxt = []
        for obj in frontier:
            if id(obj) in seen or obj is None or isinstance(obj, (type, str, int, float)):
                continue
            seen.add(id(obj))
            call = getattr(obj, "current_callable", None)
            if callable(call) and type(obj).__name__ in ("CompiledFxGraph", "OutputCode"):
                return call
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    nxt.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            for attr in ("__wrapped__", "compiled_fn", "__self__"):
                nxt.append(getattr(obj, attr, None))
            if isinstance(obj, (list, tuple)):
                nxt.extend(obj)
            elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
                nxt.extend(vars(obj).values())
        frontier = nxt
    return None


def mutates(gm: fx.GraphModule) -> bool:
    """Whether the graph may write into a value (an in-place op or an item assignment)."""
    for n in gm.graph.nodes:
        if n.op == "call_method" and str(n.target).endswith("_"):
            return True
        if n.op == "call_function":
            if n.target in _OPERATOR_WRITES:
                return True
            if getattr(n.target, "__module__", None) in ("operator", "_operator"):
                continue
            name = getattr(n.target, "__name__", "")
            if name.endswith("_") and not name.endswith("__"):
                return True
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return True
    return False


def _same(a: Sequence[Any], b: Sequence[Any] | None) -> bool:
    if b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and x.stride() == y.stride()
                    and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


class DirectCall:
    """``compiled(*args)``, or, once checked equal, the generated code it wraps (no grad)."""

    def __init__(self, compiled: Callable[..., Any], module: fx.GraphModule) -> None:
        self.compiled = compiled
        self.inner = None if mutates(module) else output_code(compiled)
        self.checked: bool | None = None if self.inner is not None else False

    @property
    def direct(self) -> bool:
        """Whether calls without grad skip the wrappers."""
        return bool(self.checked)

    def __call__(self, *args: Any) -> Any:
        if self.checked is False or torch.is_grad_enabled():
            return self.compiled(*args)
        assert self.inner is not None
        if self.checked:
            return self.inner(list(args))
        outs = self.compiled(*args)
        try:
            mine = self.inner(list(args))
        except Exception:  # a calling convention this module does not know
            mine = None
        self.checked = _same(list(outs), None if mine is None else list(mine))
        return outs
