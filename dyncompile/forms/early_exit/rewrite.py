"""Form ``early_exit``: confidence exits on the residual stream between detected layers.

The pass finds the model's main residual stream (the chain of residual blocks
that ends at the output), takes the stream value entering each layer as an
exit point, and cuts the graph there into segments, one per layer, plus the
head (everything after the last layer: final norm + LM head, pooler,
classifier, or nothing). The exit head is that same head applied to the
intermediate state, so no model-specific code is needed:

- a head that ends in logits (classifier, LM) gives a confidence signal: the
  max softmax probability;
- a head whose output is as wide as the stream (an embedding model) gives a
  convergence signal: the cosine between the pooled outputs at consecutive
  exits.

Calibration runs every layer and records, at each exit, the signal and the
quality it would have had (agreement with the full model's prediction, or the
cosine to its output); a monotone map turns signals into predicted quality, and
the budget picks one threshold on it from the calibration rows' mean cost.
The cut graph runs in :mod:`dyncompile.forms.early_exit.program`; each piece is
compiled on its own, so rows can leave the batch between layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import sympy
import torch
from torch import fx

from ...core.registry import register_form
from ...passes.attention_masks import hoist_mask_conversions
from ...passes.base import Pass, PassContext
from ...passes.blocks import ResidualBlock
from ...passes.graph_utils import (
    node_value,
    placeholder_info,
    shape_of,
    sym,
    tensor_value,
    to_nx,
)
from ...passes.pooling import find_pooling, live_nodes
from ...passes.splice import linear_cost
from ...passes.stream import clean_cuts, final_state, stream_chain
from ...passes.weights import Weights
from ...program.pieces import build_piece, cut_at
from .checks import build_check
from .fit import QualityMap, ThresholdCurve
from .program import (
    CONFIDENCE,
    CONVERGENCE,
    FULL,
    MEAN,
    POOLED,
    ExitGraph,
    ExitRunner,
)

log = logging.getLogger("dyncompile")


# ---------------------------------------------------------------------------- runtime

MAX_STATE_ROWS = 4096  # stream rows kept per calibration call for fitting adapters
POOLED_RIDGE = 1.0     # shrinkage of pooled adapter refits towards the token fit


@dataclass(frozen=True)
class EarlyExitOptions:
    """The form takes no options: its exits always adapt the stream with a full affine
    map (refitted on the head's pooled rows where it pools, folded into the head's first
    linear where that alone reads them) and decide on the adapted state."""


def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Least-squares affine map y ~ x @ W.T + b (ridge-regularised), as (W, b)."""
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xc.T @ yc).T
    b = my - w @ mx
    return w.float().contiguous(), b.float().contiguous()


def fit_pooled(x: torch.Tensor, ones: torch.Tensor, y: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor, ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit an exit adapter on pooled rows: ``y ~ x @ W.T + ones * b`` (``ones`` = the
    pooling of an all-ones stream, so ``b`` is the token adapter's bias), ridge-regularised
    towards the token adapter ``(w0, b0)``; the bias is not shrunk."""
    x64, y64, c = x.double(), y.double(), ones.double()[:, :1]
    r = y64 - (x64 @ w0.double().T + c * b0.double())
    xc = x64 - x64.mean(0)
    scale = float((xc * xc).sum(0).mean())
    z = torch.cat([x64, c], 1)
    gram = z.T @ z
    width = x.shape[1]
    gram[:width, :width] += ridge * scale * torch.eye(width, dtype=gram.dtype)
    sol = torch.linalg.solve(gram, z.T @ r)
    return ((w0.double() + sol[:width].T).float().contiguous(),
            (b0.double() + sol[width]).float().contiguous())


class ExitRuntime:
    """Calibrated exit quality maps and the budget -> threshold curve of one model."""

    def __init__(self) -> None:
        self.signals: list[torch.Tensor] = []
        self.qualities: list[torch.Tensor] = []
        self.tokens: list[tuple[float, float]] = []  # (rows, tokens per row) per call
        self.cost_fn: Any = None
        self.maps: list[QualityMap] = []
        self.curve: ThresholdCurve | None = None
        self.signal = ""
        self._memo: dict[float, float] = {}
        self._plans: dict[tuple[float, int], tuple[list[bool], list[bool]]] = {}
        self.adapters: list[dict[str, torch.Tensor]] = []
        self.states: list[list[torch.Tensor]] = []
        # Exits pool before adapting (the head's pooling region checked out on real
        # values; None: not seen yet), with adapters refitted on the pooled rows.
        self.pool_ok: bool | None = None
        self.pooled_states: list[list[torch.Tensor]] = []
        self.pooled_adapters: list[dict[str, torch.Tensor]] = []
        self._cuts: dict[tuple[int, float], torch.Tensor] = {}
        self._mats: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}
        # Per (graph, threshold, grad mode, fused checks): the straight-line path of a
        # call where no row leaves (forms/early_exit/fast.py), with the adapters and cuts it takes.
        self._fast: dict[tuple[Any, ...], Any] = {}
        self.recording = False
        self.graphs: list[ExitGraph] = []  # the cut graphs using this runtime
        # Where the model's stream lives: calibration statistics and fits stay on the CPU;
        # what the hot path reads (adapters, cuts) is placed here.
        self.device = torch.device("cpu")
        self._never: torch.Tensor | None = None

    @property
    def calibrated(self) -> bool:
        return self.curve is not None

    def observe_states(self, states: list[torch.Tensor], final: torch.Tensor) -> None:
        """Record the stream at each exit and the final state (calibration, first pass)."""
        if self.states and len(states) != len(self.states[0]) - 1:
            return
        self.device = final.device
        width = final.shape[-1]
        rows = [s.detach().reshape(-1, width) for s in [*states, final]]
        n = rows[0].shape[0]
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(len(self.states)))
        keep = keep[:MAX_STATE_ROWS]
        self.states.append([r[keep].float().cpu() for r in rows])

    def exit_overhead(self, width: int) -> float:
        """FLOPs per row-token an exit adds besides the head (the adapter)."""
        return 2.0 * self.adapters[0]["w"].numel() if self.adapters else 0.0

    def observe_pooled(self, pooled: list[list[torch.Tensor]], ones: list[torch.Tensor]) -> None:
        """Record the head's pooled values of the stream at each exit and of the final
        state (calibration, first pass), and the pooling of an all-ones stream."""
        if self.pooled_states and len(pooled) != len(self.pooled_states[0]) - 1:
            return
        width = ones[0].shape[-1]
        rows = [torch.cat([v.detach().reshape(-1, width).float().cpu() for v in vals])
                for vals in [*pooled, ones]]
        self.pooled_states.append(rows)

    def adapt(self, k: int, state: torch.Tensor, bias_scale: torch.Tensor | None = None,
              pooled: bool = False) -> torch.Tensor:
        """The stream at exit ``k`` mapped towards the final state (identity without an
        adapter). ``pooled``: ``state`` is the head's pooling of the stream, whose
        all-ones pooling ``bias_scale`` scales the bias; the adapter refitted on pooled
        rows applies when there is one."""
        if not self.adapters:
            return state
        a = (self.pooled_adapters or self.adapters)[k - 1] if pooled else self.adapters[k - 1]
        dt = state.dtype
        b = a["b"].to(dt) if bias_scale is None else a["b"].to(dt) * bias_scale.to(dt)
        return torch.nn.functional.linear(state, a["w"].to(dt)) + b

    def adapter_args(self, k: int, width: int, dtype: torch.dtype, pooled: bool = False,
                     fold: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Exit ``k``'s adapter as the fused exit checks take it, in ``dtype``: ``(w, b)``
        with ``adapt(state) == F.linear(state, w) + b`` (no bias scale; the identity
        without adapters); with ``fold`` (the weight ``W`` of the head linear the checks
        fold the adapter into) ``(W @ w, W @ b)``."""
        key = (k, pooled, dtype, width) if fold is None else \
            (k, pooled, dtype, width, id(fold), fold._version, fold.device)
        got = self._mats.get(key)
        if got is None:
            a = None
            if self.adapters:
                a = (self.pooled_adapters or self.adapters)[k - 1] if pooled \
                    else self.adapters[k - 1]
            if fold is not None:
                w, b = self.adapter_args(k, width, torch.float64, pooled)
                f = fold.detach().to(w.device, torch.float64)
                parts = (f @ w, f @ b)
            elif a is None:
                parts = (torch.eye(width, device=self.device),
                         torch.zeros(width, device=self.device))
            else:
                parts = (a["w"], a["b"])
            got = self._mats[key] = tuple(t.to(dtype).contiguous() for t in parts)
        return got

    def observe(self, graph: ExitGraph, signals: torch.Tensor, qualities: torch.Tensor,
                tokens: float = 1.0, mode: str = FULL) -> None:
        """Record one calibration call: [rows, exits] signals and qualities, for rows of
        ``tokens`` tokens; ``mode``: how the exits decided (``ExitRunner.mode``)."""
        if self.signals and signals.shape[1] != self.signals[0].shape[1]:
            return  # another graph of the same model with a different depth
        self.signals.append(signals.detach().float().cpu())
        self.qualities.append(qualities.detach().float().cpu())
        self.tokens.append((float(signals.shape[0]), tokens))
        rows = sum(n for n, _ in self.tokens)
        mean_tokens = sum(n * t for n, t in self.tokens) / rows
        costs = graph.unit_costs(mean_tokens, self.exit_overhead(graph.width), mode)
        self.cost_fn = lambda checked: graph.exit_cost(costs, checked)
        self.signal = graph.signal

    def finalize(self) -> None:
        """After the first pass: fit the adapters; the second pass (``refine``) records
        signals and qualities."""
        if self.states:
            exits = len(self.states[0]) - 1
            cols = [torch.cat([c[k] for c in self.states]) for k in range(exits + 1)]
            self.adapters = []
            for k in range(exits):
                w, b = fit_affine(cols[k], cols[-1])
                self.adapters.append({"w": w, "b": b})
            self._fit_pooled()
            self._place()
            self.states, self.pooled_states = [], []
            self.recording = True
        self._fit_maps()

    def _fit_pooled(self) -> None:
        """Refit each adapter on the pooled rows the head actually reads (ridge towards the
        token fit: there is one pooled row per sample)."""
        self.pooled_adapters = []
        if not self.pooled_states or not self.pool_ok or not self.adapters:
            return
        cols = [torch.cat([c[k] for c in self.pooled_states])
                for k in range(len(self.pooled_states[0]))]
        ones, final = cols[-1], cols[-2]
        for k, a in enumerate(self.adapters):
            w, b = fit_pooled(cols[k], ones, final, a["w"], a["b"], POOLED_RIDGE)
            self.pooled_adapters.append({"w": w, "b": b})

    def _place(self) -> None:
        """Move the fitted adapters to the stream's device (fits run on the CPU)."""
        for ads in (self.adapters, self.pooled_adapters):
            for a in ads:
                for name, t in a.items():
                    a[name] = t.to(self.device)
        self._mats.clear()
        self._cuts.clear()
        self._fast.clear()
        self._never = None

    @property
    def never(self) -> torch.Tensor:
        """The cut of an exit that cannot fire (no signal reaches it), on the stream's
        device."""
        if self._never is None:
            self._never = torch.full((), float("inf"), device=self.device)
        return self._never

    def refine(self, run_at: Any) -> None:
        """Second calibration pass at budget 1.0: every exit's signal and quality."""
        if not self.recording:
            return
        try:
            run_at(1.0)
        finally:
            self.recording = False
        self._fit_maps()

    def _fit_maps(self) -> None:
        if not self.signals:
            return
        sig = torch.cat(self.signals)
        qual = torch.cat(self.qualities)
        self.maps = [QualityMap.fit(sig[:, k], qual[:, k]) for k in range(sig.shape[1])]
        mapped = torch.stack([m(sig[:, k]) for k, m in enumerate(self.maps)], 1)
        assert self.cost_fn is not None
        self.curve = ThresholdCurve.fit(mapped, lambda t: self.cost_fn(
            self.plan(t, len(self.maps))[1]))
        self.signals, self.qualities, self.tokens = [], [], []
        self._memo.clear()
        self._mats.clear()
        self._cuts.clear()
        self._plans.clear()
        self._fast.clear()
        log.info("early_exit: calibrated %d exits on %d rows", sig.shape[1], sig.shape[0])

    def quality(self, k: int, signal: torch.Tensor) -> torch.Tensor:
        """Predicted quality at exit ``k`` (1-based) for these signals."""
        return self.maps[k - 1](signal)

    def cut(self, k: int, threshold: float) -> torch.Tensor:
        """The signal at which exit ``k``'s predicted quality reaches ``threshold``, as a
        0-dim float32 tensor (what the fused exit checks compare with)."""
        key = (k, threshold)
        cut = self._cuts.get(key)
        if cut is None:
            cut = self._cuts[key] = torch.tensor(self.maps[k - 1].cut(threshold),
                                                 dtype=torch.float32, device=self.device)
        return cut

    def leaves(self, k: int, signal: torch.Tensor, threshold: float) -> torch.Tensor:
        """Whether each signal's predicted quality at exit ``k`` reaches ``threshold``: one
        comparison with the signal the map reaches it at."""
        return signal >= self.cut(k, threshold)

    def plan(self, threshold: float, exits: int) -> tuple[list[bool], list[bool]]:
        """Which exits can fire at ``threshold`` (their best calibrated quality reaches
        it), and which must be evaluated: those, and the one before each (its output is
        the next exit's reference)."""
        key = (threshold, exits)
        got = self._plans.get(key)
        if got is None:
            fire = [bool(m.values.max() >= threshold) for m in self.maps[:exits]]
            fire += [False] * (exits - len(fire))
            checked = [f or (i + 1 < exits and fire[i + 1]) for i, f in enumerate(fire)]
            got = self._plans[key] = (fire, checked)
        return got

    def threshold(self, budget: float) -> float:
        if self.curve is None:
            raise RuntimeError("early_exit: not calibrated; pass calibration batches to "
                               "dyncompile.optimize()")
        t = self._memo.get(budget)
        if t is None:
            t = self._memo[budget] = self.curve.threshold(budget)
        return t

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.curve is not None
        tensors = {"thresholds": self.curve.thresholds, "fractions": self.curve.fractions}
        for k, m in enumerate(self.maps):
            tensors[f"centers.{k}"] = m.centers
            tensors[f"values.{k}"] = m.values
        for prefix, ads in (("adapter", self.adapters), ("pooled", self.pooled_adapters)):
            for k, a in enumerate(ads):
                for name, t in a.items():
                    tensors[f"{prefix}_{name}.{k}"] = t.cpu()
        return tensors, {"exits": len(self.maps), "signal": self.signal,
                         "adapters": len(self.adapters), "pool_ok": self.pool_ok,
                         "pooled_adapters": len(self.pooled_adapters)}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                model: torch.nn.Module) -> None:
        self.maps = [QualityMap(tensors[f"centers.{k}"], tensors[f"values.{k}"])
                     for k in range(int(meta["exits"]))]
        self.curve = ThresholdCurve(tensors["thresholds"], tensors["fractions"])
        self.signal = meta.get("signal", "")
        self.adapters = [{name: tensors[f"adapter_{name}.{k}"] for name in ("w", "b")}
                         for k in range(int(meta.get("adapters", 0)))]
        self.pool_ok = meta.get("pool_ok")
        self.pooled_adapters = [{name: tensors[f"pooled_{name}.{k}"] for name in ("w", "b")}
                                for k in range(int(meta.get("pooled_adapters", 0)))]
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self._place()
        self._memo.clear()
        self._plans.clear()


# ---------------------------------------------------------------------------- graph side


def exit_points(residuals: list[ResidualBlock], attention_names: set[str],
                g: nx.DiGraph) -> tuple[list[fx.Node], str]:
    """Stream values b_0 (entering the first layer) .. b_{L-1}, then the final state f.

    A layer starts at each residual of the stream whose branch holds attention
    (every residual if none does). For a post-norm stack the final state is
    reached from the last add by the same ops that lead from each layer's last
    add to the next layer's input. Returns ([], reason) when there is no stack.
    """
    chain = stream_chain(residuals, g)
    starts = [r for r in chain if set(r.contains) & attention_names] or chain
    if len(starts) < 2:
        return [], f"{len(starts)} layer(s) on the residual stream"
    stream = [r.skip for r in starts]
    last = chain[-1].add
    # The ops between a layer's last add and the next layer's input (post-norm).
    before = chain[chain.index(starts[1]) - 1]
    final = final_state(before.add, starts[1].skip, last, g)
    if final is None:
        return [], "the stream between layers is not a path"
    stream.append(final)
    return stream, ""


def _is_batch(node: fx.Node, batch: sympy.Expr, inputs_derived: set[fx.Node]) -> bool:
    val = tensor_value(node)
    if val is None or val.dim() < 1:
        return False
    if sym(val.shape[0]) != batch:
        return False
    if isinstance(batch, sympy.Integer):
        return node in inputs_derived
    return True


@register_form
class EarlyExitForm(Pass):
    """Cut the graph at its layer boundaries and let rows exit where the head is sure."""

    name = "early_exit"
    stage = 90
    Options = EarlyExitOptions
    looks_for = ("a residual stream through two or more layers whose boundaries cut the "
                 "graph cleanly")
    runtime = ExitRuntime
    dynamic_batch = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        assert ctx.blocks is not None and ctx.state is not None
        if ctx.program is not None:
            ctx.log.append("early_exit: left dense (another form already runs this graph)")
            return []
        graph = self.plan(gm, ctx)
        if isinstance(graph, str):
            ctx.log.append(f"early_exit: left dense ({graph})")
            return []
        runtime = ctx.state.form(self.name, ExitRuntime)
        ctx.program = ExitRunner(graph, runtime, ctx.state)
        runtime.graphs.append(graph)
        gm.meta["dyn_exit_graph"] = graph
        ctx.log.append(f"early_exit: {graph.exits} exit(s), {graph.signal} signal"
                       f"{', per token' if graph.token_level else ''}")
        return [f"exit {k} (after layer {k})" for k in range(1, graph.exits + 1)]

    def plan(self, gm: fx.GraphModule, ctx: PassContext) -> ExitGraph | str:
        """Cut ``gm`` for early exit, or say why it cannot be."""
        blocks = ctx.blocks
        assert blocks is not None
        g = to_nx(gm.graph)
        attention = {b.name for b in blocks.attention}
        stream, why = exit_points(blocks.residual, attention, g)
        if not stream:
            return why
        # Pieces would each convert a boolean attention mask again: convert it once.
        hoist_mask_conversions(gm)
        good = clean_cuts(gm, stream)
        stream = [stream[0], *[stream[k] for k in good], stream[-1]]
        if len(stream) < 3:
            return "no layer boundary cuts the graph cleanly"
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        raw = gm.graph.output_node().args[0]
        outputs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        out_set = {o for o in outputs if isinstance(o, fx.Node)}
        seg_nodes, head_nodes, handed_on = cut_at(gm, stream)
        body = [n for ns in seg_nodes for n in ns] + head_nodes
        f = stream[-1]
        segments = []
        for j, ns in enumerate(seg_nodes):
            wanted = list(handed_on[j])
            if j == 0:
                wanted.append(stream[0])
            segments.append(build_piece(gm, f"segment{j}", ns, wanted))
        head_out = [o for o in outputs if isinstance(o, fx.Node) and
                    (o in set(head_nodes) or o is f)]
        head = build_piece(gm, "head", head_nodes, head_out)
        live_head = live_nodes(head_nodes, head_out)
        pooling = find_pooling(head_nodes, f, head_out)
        pool = post = None
        post_cost = 0.0
        if pooling is not None:
            pool = build_piece(gm, "pool", pooling.nodes, pooling.outputs)
            post_nodes = live_nodes(head_nodes, head_out, stop=set(pooling.outputs))
            post = build_piece(gm, "post", post_nodes, head_out)
            post_cost = linear_cost(post.nodes, blocks.linears)
        whole = build_piece(gm, "whole", body, [o for o in outputs if isinstance(o, fx.Node)])
        # Graph outputs made inside a layer (a decoder's cache) need filling for exited rows.
        fills: list[Any] = []
        first_seg = set(seg_nodes[0])
        for j, ns in enumerate(seg_nodes):
            made = [n for n in ns if n in out_set and n is not stream[j + 1]]
            if j == 0 or not made:
                fills.append(None)
                continue
            anc: set[fx.Node] = set()
            for m in made:
                anc |= nx.ancestors(g, m) | {m}
            part = [n for n in ns if n in anc]
            piece = build_piece(gm, f"fill{j}", part, made)
            bad = [u for u in piece.inputs if u.op not in ("placeholder", "get_attr")
                   and u is not stream[j] and u not in first_seg]
            if bad:
                return f"layer {j} outputs read values of earlier layers ({bad[0].name})"
            fills.append(piece)
        # The head output that decides: the largest floating output derived from f.
        derived = nx.descendants(g, f) | {f}
        cands = [o for o in head_out if o in derived and tensor_value(o) is not None
                 and tensor_value(o).is_floating_point()]
        if not cands:
            return "no floating output depends on the last layer"
        primary = max(cands, key=lambda o: _numel_hint(tensor_value(o)))
        width = shape_of(f)[-1] if shape_of(f) else None
        pshape = shape_of(primary)
        signal = CONVERGENCE if pshape and pshape[-1] == width else CONFIDENCE
        token_level = signal == CONFIDENCE and pshape is not None and len(pshape) >= 3
        # Which values carry the batch in dim 0.
        bshape = shape_of(stream[0])
        if not bshape:
            return "the stream has no shape"
        batch = sym(bshape[0])
        user_inputs = [n for n in nodes if n.op == "placeholder" and
                       _placeholder_kind(n) == "input"]
        inputs_derived: set[fx.Node] = set(user_inputs)
        for n in user_inputs:
            inputs_derived |= nx.descendants(g, n)
        batch_nodes = {n for n in nodes if n.op != "output" and
                       _is_batch(n, batch, inputs_derived)}
        batch_ints = set()
        if not isinstance(batch, sympy.Integer):
            for n in nodes:
                v = node_value(n)
                if isinstance(v, torch.SymInt) and sym(v) == batch:
                    batch_ints.add(n)
        linears = blocks.linears
        eg = ExitGraph(
            placeholders=[n for n in nodes if n.op == "placeholder"], outputs=outputs,
            stream=stream, segments=segments, head=head, fills=fills, primary=primary,
            signal=signal, batch=batch_nodes, batch_ints=batch_ints, token_level=token_level,
            segment_cost=[linear_cost(ns, linears) for ns in seg_nodes],
            head_cost=linear_cost(sorted(live_head, key=pos.__getitem__), linears),
            fill_cost=[linear_cost(p.nodes, linears) if p is not None else 0.0
                       for p in fills],
            static_rows=isinstance(batch, sympy.Integer) and int(batch) > 1, whole=whole,
            pool=pool, post=post, post_cost=post_cost)
        _fuse_checks(eg, Weights(gm, ctx, convert=False).param)
        return eg


def _fuse_checks(g: ExitGraph, param: Callable[[fx.Node], torch.Tensor | None]) -> None:
    """Give ``g`` its layer pieces fused with the exit checks, where a check reads one
    pooled row per sample (``checks.py``); ``param``: the parameter behind a weight node
    (to fold adapters into the head's first linear)."""
    if g.token_level:
        return
    if g.pool is not None:
        mode = POOLED
    elif g.decides_on_stream:
        mode = MEAN
    else:
        return
    try:
        g.checks = [build_check(k, g.segments[k - 1], g.stream, g.signal, mode, g.primary,
                                g.pool, g.post, param) for k in range(1, g.exits + 1)]
        g.checks_mode = mode
    except Exception as e:  # a graph the builder cannot copy: checks stay unfused
        log.info("early_exit: exit checks not fused into the layer pieces (%s)", e)


def _numel_hint(t: torch.Tensor) -> int:
    n = 1
    for d in t.shape:
        n *= d if isinstance(d, int) else 1 << 20
    return n


def _placeholder_kind(n: fx.Node) -> str:
    return placeholder_info(n)[0]
