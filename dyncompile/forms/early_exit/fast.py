"""A straight-line path through an early-exit graph for a call in which no row leaves.

On one short sequence a small encoder's layer takes a few milliseconds, and the
generic row-mode loop (an environment dict keyed by graph nodes, check results,
cost accounting, row indices) spent 60-130 us at each layer boundary: after a
layer's kernels have streamed its weights through the caches, every Python
object the loop touches is a cache miss. Summed over six layers that was 2.4%
of the forward, half of what checking every exit cost when no row left.

:func:`build` lays out, for one exit plan, the pieces to call in order (a segment
fused with its exit check where the exit is checked, the plain segment where it is
not, then the last segment and the head) over a flat list of value slots, and
:class:`FastRows` runs them in one tight loop that returns as soon as a check says
that a row leaves. The runner then rebuilds its environment from the values made
so far and resumes its generic loop at that exit, with that check's outputs: the
straight line only ever covers the exits at which nobody left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ...program.direct_call import DirectCall

DONE = 0  # what ``FastRows.fn`` returns first when every row ran every layer


@dataclass(eq=False)
class _Step:
    """One piece call: read ``ins`` slots (or ``extra`` values per call), write ``outs``."""

    label: str
    fn: Callable[[list[Any]], Any]
    ins: list[int]
    outs: list[tuple[int, int]]        # (output index, slot)
    exit: int = 0                      # k > 0: exit k's fused check
    n_out: int = 0                     # the check's segment outputs (its flags follow)
    prev: int | None = None            # slot of the previous check's summary, if read
    zeros: Callable[[int], torch.Tensor] | None = None  # the summary when not evaluated
    made: list[int] = field(default_factory=list)  # slots made so far (for a bail-out)


@dataclass(eq=False)
class FastRows:
    """One straight-line run of every layer of an exit graph for one exit plan.

    ``fn(args, adapters, cuts)`` takes the graph's placeholder values, a tuple per exit
    of the adapter tensors its check takes (empty where it is not checked) and each
    exit's cut. It returns ``(DONE, outputs, first)`` (the graph's outputs, the stream
    after layer 0) when no row left, else ``(k, check_outputs, values)``: exit ``k``'s
    fused check said that a row leaves, and ``values`` are those of ``bail_nodes[k]``.
    ``labels``: the pieces called, in order (``C<k>`` a fused check, ``S<k>`` a plain
    segment, ``S_last``, ``H``).
    """

    steps: list[_Step]
    n_slots: int
    n_args: int
    first: int
    outputs: list[tuple[bool, Any]]    # (is a slot, slot or constant)
    bail_nodes: dict[int, list[fx.Node]]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.steps]

    def fn(self, args: Sequence[Any], adapters: Sequence[Sequence[Any]],
           cuts: Sequence[Any]) -> tuple[int, Any, Any]:
        vals: list[Any] = [None] * self.n_slots
        vals[:self.n_args] = args
        summary: Any = None
        for st in self.steps:
            ins = [vals[i] for i in st.ins]
            k = st.exit
            if k:
                ins += adapters[k - 1]
                ins.append(cuts[k - 1])
                if st.prev is not None:
                    ins.append(summary)
                elif st.zeros is not None:
                    ins.append(st.zeros(vals[self.first].shape[0]))
            o = st.fn(ins)
            for j, slot in st.outs:
                vals[slot] = o[j]
            if k:
                if o[st.n_out + 3]:
                    return k, o, tuple(vals[i] for i in st.made)
                summary = o[st.n_out + 1]
        outs = tuple(vals[v] if is_slot else v for is_slot, v in self.outputs)
        return DONE, outs, vals[self.first]


def bind(fn: Callable[..., Any]) -> Callable[[list[Any]], Any]:
    """``fn`` as a callable on one list of arguments: the generated code itself for a
    piece whose direct call checked out (and no grad), else ``fn(*args)``."""
    if isinstance(fn, DirectCall) and fn.direct and not torch.is_grad_enabled():
        assert fn.inner is not None
        return fn.inner
    return lambda args: fn(*args)


def ready(fns: Sequence[Callable[..., Any]]) -> bool:
    """Whether every compiled piece has been checked (a direct call decided), so that
    what :func:`bind` picks will not change."""
    return not any(isinstance(f, DirectCall) and f.checked is None for f in fns)


def build(g: Any, checks: Sequence[Any], checked: Sequence[bool],
          zeros: Callable[[Any, int], torch.Tensor]) -> FastRows | None:
    """The straight-line run of exit graph ``g`` that evaluates exit ``k``'s fused check
    (``checks[k - 1]``) where ``checked[k - 1]``; ``zeros(check, rows)`` makes the
    previous summary of a check whose previous exit was not evaluated. None when an
    output of the graph is not made by its pieces."""
    slots: dict[fx.Node, int] = {p: i for i, p in enumerate(g.placeholders)}
    made: list[fx.Node] = list(g.placeholders)
    steps: list[_Step] = []

    def slot(n: fx.Node) -> int:
        if n not in slots:
            slots[n] = len(slots)
        return slots[n]

    def step(label: str, fn: Any, inputs: list[fx.Node], outputs: list[fx.Node],
             **kw: Any) -> _Step:
        ins = [slots[n] for n in inputs]
        outs = []
        for j, node in enumerate(outputs):
            if node in g.placeholders:  # passed through: the slot already holds it
                continue
            outs.append((j, slot(node)))
            if node not in made:
                made.append(node)
        st = _Step(label, bind(fn), ins, outs, **kw)
        steps.append(st)
        return st

    bail: dict[int, list[fx.Node]] = {}
    first = g.stream[1] if len(g.stream) > 1 else g.stream[-1]
    for k in range(1, g.exits + 1):
        if not checked[k - 1]:
            seg = g.segments[k - 1]
            if seg.nodes:
                step(f"S{k}", seg.fn, seg.inputs, seg.outputs)
            continue
        c = checks[k - 1]
        prev, zero = None, None
        if c.takes_prev:
            if checked[k - 2]:
                prev = k - 1
            else:
                zero = lambda rows, c=c: zeros(c, rows)  # noqa: E731
        st = step(f"C{k}", c.fn, c.inputs, c.segment.outputs, exit=k,
                  n_out=len(c.segment.outputs), prev=prev, zeros=zero)
        bail[k] = list(made)
        st.made = [slots[n] for n in made]
    for p, label in ((g.segments[g.exits], "S_last"), (g.head, "H")):
        if p.nodes:
            step(label, p.fn, p.inputs, p.outputs)
    outputs: list[tuple[bool, Any]] = []
    for o in g.outputs:
        if isinstance(o, fx.Node):
            if o not in slots:
                return None
            outputs.append((True, slots[o]))
        else:
            outputs.append((False, o))
    if first not in slots:
        return None
    return FastRows(steps=steps, n_slots=len(slots), n_args=len(g.placeholders),
                    first=slots[first], outputs=outputs, bail_nodes=bail)
