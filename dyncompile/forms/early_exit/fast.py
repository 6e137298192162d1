"""A straight-line path through an early-exit graph for a call in which no row leaves.

On one short sequence a small encoder's layer takes a few milliseconds, and the
generic row-mode loop (an environment dict keyed by graph nodes, check results,
cost accounting, row indices) spent 60-130 us at each layer boundary: after a
layer's kernels have streamed its weights through the caches, every Python
object the loop touches is a cache miss. Summed over six layers that was 2.4%
of the forward, half of what checking every exit cost when no row left.

:func:`build` writes, for one exit plan, one Python function that calls the
pieces in order (a segment fused with its exit check where the exit is checked,
the plain segment where it is not, then the last segment and the head) with
every value in a local variable, and returns as soon as a check says that a row
leaves. The runner then rebuilds its environment from the values made so far
and resumes its generic loop at that exit, with that check's outputs: the
straight line only ever covers the exits at which nobody left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ...program.direct_call import DirectCall

DONE = 0  # what ``FastRows.fn`` returns first when every row ran every layer


@dataclass(eq=False)
class FastRows:
    """One generated run of every layer of an exit graph for one exit plan.

    ``fn(args, adapters, cuts)`` takes the graph's placeholder values, a tuple per exit
    of the adapter tensors its check takes (empty where it is not checked) and each
    exit's cut. It returns ``(DONE, outputs, first)`` (the graph's outputs, the stream
    after layer 0) when no row left, else ``(k, check_outputs, values)``: exit ``k``'s
    fused check said that a row leaves, and ``values`` are those of ``bail_nodes[k]``.
    """

    fn: Callable[..., tuple[int, Any, Any]]
    bail_nodes: dict[int, list[fx.Node]]
    source: str


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
    names: dict[fx.Node, str] = {}
    made: list[fx.Node] = []
    glob: dict[str, Any] = {}
    lines = ["def fast(args, adapters, cuts):"]
    for i, p in enumerate(g.placeholders):
        names[p] = f"p{i}"
        made.append(p)
    if g.placeholders:
        lines.append(f"    {', '.join(names[p] for p in g.placeholders)}, = args")

    def name(n: fx.Node) -> str:
        if n not in names:
            names[n] = f"v{len(names)}"
        return names[n]

    def call(fn_name: str, fn: Any, args: list[str], outputs: list[fx.Node]) -> None:
        glob[fn_name] = bind(fn)
        lines.append(f"    o = {fn_name}([{', '.join(args)}])")
        for j, node in enumerate(outputs):
            if node not in names or not names[node].startswith("p"):  # not passed through
                lines.append(f"    {name(node)} = o[{j}]")
                if node not in made:
                    made.append(node)

    bail: dict[int, list[fx.Node]] = {}
    first = g.stream[1] if len(g.stream) > 1 else g.stream[-1]
    for k in range(1, g.exits + 1):
        if not checked[k - 1]:
            seg = g.segments[k - 1]
            if seg.nodes:
                call(f"S{k}", seg.fn, [names[n] for n in seg.inputs], seg.outputs)
            continue
        c = checks[k - 1]
        n_out = len(c.segment.outputs)
        args = [names[n] for n in c.inputs]
        lines.append(f"    a = adapters[{k - 1}]")
        args += [f"a[{j}]" for j in range(len(c.adapter_shapes(g.width)))]
        args.append(f"cuts[{k - 1}]")
        if c.takes_prev:
            if checked[k - 2]:
                args.append(f"s{k - 1}")
            else:
                glob[f"Z{k}"] = lambda rows, c=c: zeros(c, rows)
                args.append(f"Z{k}({names[first]}.shape[0])")
        call(f"C{k}", c.fn, args, c.segment.outputs)
        bail[k] = list(made)
        lines.append(f"    if o[{n_out + 3}]:")
        lines.append(f"        return {k}, o, ({''.join(names[n] + ', ' for n in made)})")
        lines.append(f"    s{k} = o[{n_out + 1}]")
    for p, label in ((g.segments[g.exits], "S_last"), (g.head, "H")):
        if p.nodes:
            call(label, p.fn, [names[n] for n in p.inputs], p.outputs)
    outs = []
    for i, o in enumerate(g.outputs):
        if isinstance(o, fx.Node):
            if o not in names:
                return None
            outs.append(names[o])
        else:
            glob[f"K{i}"] = o
            outs.append(f"K{i}")
    lines.append(f"    return {DONE}, ({''.join(x + ', ' for x in outs)}), {names[first]}")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<dyncompile early-exit rows: {len(lines)} lines>", "exec"), glob)
    return FastRows(fn=glob["fast"], bail_nodes=bail, source=source)
