"""Exit checks fused into the layer pieces of an early-exit graph.

An exit check that reads a pooled row per sample (the head's pooling region,
or the token mean of a stream that is the model's output) costs almost no
FLOPs, but run on its own it is a dozen small eager ops and two more compiled
calls per exit: on a single short sequence that is a tenth of the forward.
Here each segment ``k - 1`` (the layer before exit ``k``) is rebuilt as one
graph that also computes exit ``k``'s check from the state it has just made:

- MEAN (the output is the stream): the token mean, the exit's adapter, and the
  cosine to the previous exit's adapted mean;
- POOLED: the head's pooling region on the state, the adapter on the pooled
  rows (bias scaled by the pooling of an all-ones stream), the rest of the
  head, then the confidence (max softmax, less one where the prediction changed
  since the previous exit) or the cosine of the pooled outputs. Where the head
  reads its pooled rows with one linear only (a BERT pooler, a classifier's
  dense layer), the adapter folds into it: ``W (A p + s b) = (W A) p + s (W b)``,
  so the check takes ``(W A, W b)`` and makes one matrix product instead of two.

The graph also decides: a row leaves when its signal reaches the cut (the
signal at which the exit's calibrated quality reaches the budget's threshold),
and one flag says whether any row does, so no eager op runs between layers
when nothing leaves (after a layer's kernels, each eager op runs with cold
caches: about 70 us for a compare and a reduction on one sentence).

The adapter (``w``, ``b``), the cut and the previous exit's summary are inputs,
so the graph is built and compiled before calibration and never again. Exit 1 has no
previous exit: a convergence signal compares with the (unadapted) exit-0
state, which segment 0 computes in the same graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ...passes.linears import LinearSite, match_linear
from ...program.pieces import Piece
from .modes import CONFIDENCE, MEAN, POOLED


@dataclass(eq=False)
class CheckPiece:
    """Segment ``exit - 1`` with exit ``exit``'s check: ``fn(*env inputs, *adapter, cut[,
    prev])`` returns the segment's outputs, then the signal, the summary (prediction or
    pooled output), which rows leave (``signal >= cut``), whether any does, and, POOLED,
    the head's outputs (``heads``) for the rows that leave. ``adapter`` is ``(w, b)``
    (affine, ``x @ w.T + b``); with ``fold`` (the weight ``W`` of the linear that alone
    reads the head's pooled rows) the adapter is folded into that linear: ``adapter`` is
    ``(W @ w, W @ b)``."""

    exit: int
    segment: Piece
    inputs: list[fx.Node]            # graph values read from the environment
    heads: list[fx.Node]             # head outputs returned after signal and summary
    takes_prev: bool                 # whether ``prev`` (the previous summary) is an input
    summary_shape: tuple[int, ...]   # one row's summary (() for a prediction)
    summary_dtype: torch.dtype
    adapter_dtype: torch.dtype       # what the adapter's tensors must be in
    module: fx.GraphModule
    fold: torch.Tensor | None = None  # the head linear's weight the adapter folds into
    fn: Callable[..., Any] = field(init=False)

    def __post_init__(self) -> None:
        self.fn = self.module

    def adapter_shapes(self, width: int) -> list[tuple[int, ...]]:
        """Shapes of the adapter tensors ``fn`` takes, for a stream of ``width``."""
        if self.fold is not None:
            out = int(self.fold.shape[0])
            return [(out, width), (out,)]
        return [(width, width), (width,)]

    def run(self, env: dict[fx.Node, Any], adapter: tuple[torch.Tensor, ...],
            cut: torch.Tensor, prev: torch.Tensor | None, rows: int) -> CheckResult:
        """Run the segment into ``env`` for its ``rows`` rows and decide the exit: a row
        leaves when its signal reaches ``cut`` (a 0-dim float32 tensor)."""
        args = [env[n] for n in self.inputs]
        args += adapter
        args.append(cut)
        if self.takes_prev:
            if prev is None:  # the previous exit was not checked: this signal goes unused
                prev = torch.zeros((rows, *self.summary_shape), dtype=self.summary_dtype,
                                   device=cut.device)
            args.append(prev)
        return self.unpack(env, self.fn(*args))

    def unpack(self, env: dict[fx.Node, Any], outs: Any) -> CheckResult:
        """Write the segment's outputs from ``fn``'s ``outs`` into ``env``; the check's."""
        n = len(self.segment.outputs)
        for node, value in zip(self.segment.outputs, outs[:n]):
            env[node] = value
        return CheckResult(outs[n], outs[n + 1], outs[n + 2], outs[n + 3],
                           dict(zip(self.heads, outs[n + 4:])))


class CheckResult(NamedTuple):
    """What a fused check returns besides the segment's outputs."""

    signal: torch.Tensor
    summary: torch.Tensor
    leave: torch.Tensor       # [rows] bool: signal >= cut
    any_leave: torch.Tensor   # 0-dim bool
    heads: dict[fx.Node, Any]


def summary(signal: str, out: Any) -> Any:
    """What a row's quality is measured on: the prediction (confidence) or the pooled
    output (convergence); works on tensors and on FX proxies alike."""
    return signal_of(signal, out, None)[1]


def signal_of(signal: str, out: Any, prev: Any | None) -> tuple[Any, Any]:
    """(signal, summary) per row for the head output ``out`` (the row-mode signal of
    :func:`dyncompile.forms.early_exit.program._signal`, written for graphs)."""
    if signal == CONFIDENCE:
        conf, pred = _logits(out).softmax(-1).max(-1)
        if prev is not None:
            conf = conf - (pred != prev).float()
        return conf, pred
    pooled = _pooled(out)
    if prev is None:
        return pooled.new_zeros(pooled.shape[:1]), pooled
    return F.cosine_similarity(pooled, prev, dim=-1), pooled


def _dims(out: Any) -> int:
    if not isinstance(out, Proxy):
        return out.dim()
    v = out.node.meta.get("example_value", out.node.meta.get("val"))
    return v.dim() if isinstance(v, torch.Tensor) else int(out.node.meta["ndim"])


def _logits(out: Any) -> Any:
    logits = out.float()
    d = _dims(out)
    if d == 3:
        return logits[:, -1]
    if d > 3:
        return logits.flatten(1, -2)[:, -1]
    return logits


def _pooled(out: Any) -> Any:
    return out.float().flatten(1, -2).mean(1) if _dims(out) > 2 else out.float()


def _reference_mean(out: Proxy, node: fx.Node) -> Proxy:
    """Exit 1's reference, the exit-0 stream's token mean (``_pooled``), through the
    serial ``token_mean`` kernel for a float32 [rows, tokens, width] stream on the CPU
    (inside the check graph Inductor would make the check's tail kernel parallel for
    it); else as ``_pooled``."""
    v = node.meta.get("example_value", node.meta.get("val"))
    if (isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dim() == 3
            and v.dtype == torch.float32):
        from ...ops.token_mean.cpu import kernel_available

        if kernel_available():
            return torch.ops.dyncompile.token_mean(out)
    return _pooled(out)


class _Builder:
    """Copies regions of the traced graph into a new graph, substituting values."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.tracer = GraphAppendingTracer(self.graph)
        self.have: dict[fx.Node, fx.Node] = {}
        self.inputs: list[fx.Node] = []

    def placeholder(self, node: fx.Node) -> None:
        ph = self.graph.placeholder(f"in_{node.name}")
        ph.meta = dict(node.meta)
        self.have[node] = ph
        self.inputs.append(node)

    def copy(self, nodes: Iterable[fx.Node], subst: dict[fx.Node, fx.Node] | None = None
             ) -> dict[fx.Node, fx.Node]:
        """Copy ``nodes`` (graph order), reading ``subst`` first, then what is built."""
        made: dict[fx.Node, fx.Node] = dict(subst or {})

        def lookup(u: fx.Node) -> fx.Node:
            if u in made:
                return made[u]
            if u not in self.have and u.op == "get_attr":
                self.have[u] = self.graph.node_copy(u, lookup)
            return self.have[u]

        for n in nodes:
            made[n] = self.graph.node_copy(n, lookup)
        return made

    def proxy(self, node: fx.Node) -> Proxy:
        return Proxy(node, self.tracer)

    def get(self, node: fx.Node) -> fx.Node:
        """The new graph's value of ``node``: a placeholder or copy made, or an attribute."""
        if node not in self.have and node.op == "get_attr":
            self.have[node] = self.graph.node_copy(node, lambda u: self.have[u])
        return self.have[node]

    def drop_unused_inputs(self) -> None:
        """Remove the placeholders of copied values that nothing reads (the weight of a
        linear the adapter was folded into)."""
        for node in list(self.inputs):
            ph = self.have[node]
            if not ph.users:
                self.graph.erase_node(ph)
                self.inputs.remove(node)
                del self.have[node]


def _outside(nodes: Iterable[fx.Node], known: set[fx.Node]) -> list[fx.Node]:
    """Values ``nodes`` read that are neither among them nor ``known`` (nor attributes)."""
    inside = set(nodes)
    out: list[fx.Node] = []
    for n in nodes:
        for u in n.all_input_nodes:
            if u not in inside and u not in known and u.op != "get_attr" and u not in out:
                out.append(u)
    return out


def _meta_dims(node: fx.Node, source: fx.Node) -> None:
    v = source.meta.get("example_value", source.meta.get("val"))
    if isinstance(v, torch.Tensor):
        node.meta["ndim"] = v.dim()


def head_linear(pool: Piece, post: Piece, param: Callable[[fx.Node], torch.Tensor | None]
                ) -> tuple[LinearSite, torch.Tensor] | None:
    """The linear that is the only reader of the head's one pooled value (``F.linear(p, W,
    bias)``), with its weight ``W`` (``param``: the parameter behind a weight node); None
    when the head reads its pooled rows otherwise."""
    if len(pool.outputs) != 1:
        return None
    o = pool.outputs[0]
    users = list(o.users)
    if len(users) != 1 or users[0] not in set(post.nodes):
        return None
    site = match_linear(users[0])
    if site is None or site.layout != "out_in" or site.x is not o or site.output is not site.node:
        return None
    w = param(site.weight)
    return (site, w) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def build_check(exit: int, segment: Piece, stream: list[fx.Node], signal: str, mode: str,
                primary: fx.Node, pool: Piece | None = None, post: Piece | None = None,
                param: Callable[[fx.Node], torch.Tensor | None] | None = None) -> CheckPiece:
    """Segment ``exit - 1`` fused with exit ``exit``'s check (``mode`` MEAN or POOLED);
    ``param``: the parameter behind a weight node, to fold the adapter into the head's
    first linear where that alone reads the pooled rows (POOLED)."""
    if mode not in (MEAN, POOLED):
        raise ValueError(f"exit checks fuse only for {MEAN!r} or {POOLED!r} exits")
    if mode == POOLED and (pool is None or post is None):
        raise ValueError("a pooled exit check needs the head's pool and post pieces")
    gm = segment.module if not segment.nodes else segment.nodes[0].graph.owning_module
    assert gm is not None
    fold = head_linear(pool, post, param) if mode == POOLED and param is not None else None
    b = _Builder()
    f, state, first = stream[-1], stream[exit], stream[0]
    head_nodes = [*(pool.nodes if pool else []), *(post.nodes if post else [])]
    known = set(segment.inputs) | set(segment.nodes) | {f}
    passed = [o for o in (post.outputs if post else [])  # head outputs it only passes on
              if o not in known and o not in set(head_nodes)]
    for n in [*segment.inputs, *_outside(head_nodes, known), *passed]:
        if n not in b.have:
            b.placeholder(n)
    w_node = b.graph.placeholder("adapter_w")
    bias_node = b.graph.placeholder("adapter_b")
    cut_node = b.graph.placeholder("cut")
    takes_prev = exit > 1
    prev_node = b.graph.placeholder("prev") if takes_prev else None
    b.have.update(b.copy(segment.nodes))
    bias = b.proxy(bias_node)

    def adapt(x: Proxy) -> Proxy:
        """The adapter without its bias: ``x @ w.T``."""
        return F.linear(x, b.proxy(w_node))

    def head_outputs(at: fx.Node, adapted: bool) -> dict[fx.Node, Proxy]:
        """The head's outputs (POOLED) for the stream value ``at``."""
        assert pool is not None and post is not None
        got = b.copy(pool.nodes, {f: b.have[at]})
        pooled = {o: got.get(o, b.have.get(o)) for o in pool.outputs}
        folded: dict[fx.Node, fx.Node] = {}
        if adapted:
            ones = torch.ones_like(b.proxy(b.have[at]))
            got1 = b.copy(pool.nodes, {f: ones.node})
            for o in pool.outputs:
                scale = b.proxy(got1.get(o, b.have.get(o)))
                if fold is None:
                    pooled[o] = (adapt(b.proxy(pooled[o])) + bias * scale).node
                    continue
                # The pooling of ones is the same on every channel (the runtime checked
                # that pooling commutes with a channel map): one column scales W @ b.
                site = fold[0]
                y = F.linear(b.proxy(pooled[o]), b.proxy(w_node)) + bias * scale[..., :1]
                if site.bias is not None:
                    y = y + b.proxy(b.get(site.bias))
                folded[site.node] = y.node
        done = b.copy([n for n in post.nodes if n not in folded],
                      {**pooled, **folded, f: b.have[at]})
        vals = {}
        for o in post.outputs:
            node = done.get(o, pooled.get(o, b.have.get(o)))
            _meta_dims(node, o)
            vals[o] = b.proxy(node)
        return vals

    heads: list[fx.Node] = []
    head_vals: list[Proxy] = []
    if mode == MEAN:
        out = adapt(_pooled(b.proxy(b.have[state]))) + bias
        out.node.meta["ndim"] = 2
        prev = None
        if takes_prev:
            prev = b.proxy(prev_node)
        elif signal != CONFIDENCE:
            prev = _reference_mean(b.proxy(b.have[first]), first)
    else:
        vals = head_outputs(state, True)
        out = vals[primary]
        heads = list(post.outputs)
        head_vals = [vals[o] for o in heads]
        prev = None
        if takes_prev:
            prev = b.proxy(prev_node)
        elif signal != CONFIDENCE:
            prev = summary(signal, head_outputs(first, False)[primary])
    sig, summ = signal_of(signal, out, prev)
    leave = sig >= b.proxy(cut_node)
    b.graph.output(tuple([*[b.have[o] for o in segment.outputs], sig.node, summ.node,
                          leave.node, leave.any().node, *[v.node for v in head_vals]]))
    b.drop_unused_inputs()
    module = fx.GraphModule(gm, b.graph, class_name=f"Check_{exit}")
    if signal == CONFIDENCE:
        shape, dtype = (), torch.long
    else:
        ref = state if mode == MEAN else primary
        v = ref.meta.get("example_value", ref.meta.get("val"))
        shape, dtype = (int(v.shape[-1]),), torch.float32
    sv = state.meta.get("example_value", state.meta.get("val"))
    adapter_dtype = torch.float32 if mode == MEAN or not isinstance(sv, torch.Tensor) \
        else sv.dtype
    return CheckPiece(exit=exit, segment=segment, inputs=b.inputs, heads=heads,
                      takes_prev=takes_prev, summary_shape=shape, summary_dtype=dtype,
                      adapter_dtype=adapter_dtype, module=module,
                      fold=None if fold is None else fold[1])
