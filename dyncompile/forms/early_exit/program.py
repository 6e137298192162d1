"""The early-exit runtime: runs a graph cut at its layer boundaries, piece by piece.

Between layers it applies the exit head (the model's own head, on the current
residual stream) to the rows still running, maps the head's signal to a
calibrated quality, and lets the rows whose quality reaches the budget's
threshold leave:

- row mode (samples of an encoder or classifier, or one token per row while
  decoding): exited rows take the head's outputs at their exit state and leave
  the working batch, so later layers compute fewer rows; graph outputs that
  later layers produce (a decoder's KV cache) are filled for exited rows by
  running only the part of each later layer that produces them, on the exit
  state (state propagation, as CALM);
- token mode (a causal LM scoring many tokens per row): tokens freeze at their
  exit state; later layers see the frozen state (so their keys and values come
  from it) and the head reads it at the end. Nothing is compacted here, so the
  FLOPs do not fall; the quality is what per-token exit gives.

Calibration runs every layer for every row and records, at every exit, the
signal and the quality it would have had.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ...core import stats as _stats
from ...program.pieces import Piece
from ...program.rows import fixed_layouts, node_example, take_rows
from . import fast as exit_fast
from .modes import CONFIDENCE, CONVERGENCE, FULL, MEAN, POOLED  # noqa: F401  (re-exported)

FORM = "early_exit"
log = logging.getLogger("dyncompile")


@dataclass
class ExitCosts:
    """Linear FLOPs per row-token: the model's head, one exit check, a leaving row's
    output, and the check before the first exit (a convergence signal's reference)."""

    head: float
    check: float
    leave: float
    first: float


@dataclass(eq=False)
class ExitGraph:
    """One traced graph cut for early exit (built by the ``early_exit`` pass)."""

    placeholders: list[fx.Node]
    outputs: list[Any]                 # the graph's output nodes (or constants), flat
    stream: list[fx.Node]              # b_0 .. b_{L-1}, then the final state f
    segments: list[Piece]              # segment j computes stream[j + 1]
    head: Piece                        # reads f, makes the head's outputs
    fills: list[Piece | None]          # per segment: its graph outputs, from its stream input
    primary: fx.Node                   # head output whose signal decides exits
    signal: str                        # CONFIDENCE or CONVERGENCE
    batch: set[fx.Node]                # values whose dim 0 is the batch
    batch_ints: set[fx.Node]           # SymInt values equal to the batch size
    token_level: bool                  # primary output is per token ([B, S, V], V != width)
    segment_cost: list[float]          # linear FLOPs per row-token of each segment
    head_cost: float
    fill_cost: list[float]
    whole: Piece | None = None         # the whole graph as one piece: runs when no exit can fire
    pool: Piece | None = None          # the head's pooling region (passes.pooling), if any
    post: Piece | None = None          # the rest of the head, from the pooled values
    post_cost: float = 0.0             # linear FLOPs per row of ``post``
    static_rows: bool = False          # batch traced as a constant > 1: all rows leave or none
    checks: list[Any] | None = None    # per exit k: segment k - 1 fused with exit k's check
    checks_mode: str | None = None     # the runner mode the fused checks serve (MEAN, POOLED)
    compiled: bool = False
    graphs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exits(self) -> int:
        return len(self.segments) - 1

    @property
    def decides_on_stream(self) -> bool:
        """The decisive output is the final stream itself (a convergence signal on an
        encoder without a head): exits can decide on its token mean."""
        return self.signal == CONVERGENCE and self.primary is self.stream[-1]

    @cached_property
    def width(self) -> int:
        return int(self.stream[-1].meta["example_value"].shape[-1]) \
            if "example_value" in self.stream[-1].meta else 0

    def unit_costs(self, tokens: float, adapter: float, mode: str) -> ExitCosts:
        """What the head, one exit check, a leaving row's output and the first check
        (convergence) cost per row-token, for rows of ``tokens`` tokens; ``adapter`` is
        the exit adapter's FLOPs per row it maps; ``mode`` as ``ExitRunner.mode``."""
        t = max(tokens, 1.0)
        if mode == POOLED:
            head, adapt = self.post_cost / t, adapter / t
        else:
            head, adapt = self.head_cost, adapter
        if mode == MEAN:  # the decision reads the token mean; leaving rows run the head
            return ExitCosts(head, adapter / t, head + adapt, 0.0)
        first = head if self.signal == CONVERGENCE else 0.0
        return ExitCosts(head, head + adapt, 0.0, first)

    def exit_cost(self, costs: ExitCosts, checked: list[bool] | None = None) -> torch.Tensor:
        """Cost fraction of a row leaving at exit k = 1..K, then of running every layer,
        with ``costs`` per row-token (``unit_costs``) and ``checked[k - 1]`` saying
        whether exit k is evaluated at all (default: all)."""
        seg = torch.tensor(self.segment_cost, dtype=torch.float64)
        fill = torch.tensor(self.fill_cost, dtype=torch.float64)
        checked = [True] * self.exits if checked is None else checked
        dense = float(seg.sum()) + costs.head
        first = costs.first if checked and checked[0] else 0.0
        out = []
        for k in range(1, self.exits + 1):
            out.append(float(seg[:k].sum()) + sum(checked[:k]) * costs.check
                       + float(fill[k:].sum()) + first + costs.leave)
        out.append(dense + sum(checked) * costs.check + first)
        return torch.tensor(out, dtype=torch.float32) / dense

    def compile(self, compiler: str) -> None:
        """Compile every piece with Inductor, for the symbolic sizes the graph was traced
        with (the fake values dynamo recorded), so a piece serves every batch size; called
        inside the backend, while dynamo's tracing context is active."""
        if compiler == "eager" or self.compiled:
            return
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        from ...program.direct_call import DirectCall

        # No FX graph cache: a cached piece's shape guards name the sources of the dynamo
        # frame that first compiled it, which a later frame's lookup cannot evaluate.
        with inductor_config.patch(fx_graph_cache=False):
            pieces = [*self.segments, self.head, *[f for f in self.fills if f is not None],
                      *[p for p in (self.pool, self.post) if p is not None]]
            for p in [*pieces, *([self.whole] if self.whole is not None else [])]:
                if p.nodes:
                    example = self._piecenode_example(p)
                    with inductor_config.patch(size_asserts=not fixed_layouts(p.inputs,
                                                                              example)):
                        p.fn = DirectCall(compile_fx(p.module, example), p.module)
                    self.graphs += 1
            for c in self.checks or []:
                # Its other inputs (adapter, cut, previous summary) the runtime makes
                # contiguous.
                with inductor_config.patch(size_asserts=not fixed_layouts(c.inputs)):
                    c.fn = DirectCall(compile_fx(c.module, self._checknode_example(c)), c.module)
                self.graphs += 1
        self.compiled = True

    def _piecenode_example(self, p: Piece) -> list[Any]:
        """Example inputs of a piece: the fake values dynamo recorded, except that the post
        piece reads its pooled values row-major (``_post_at`` hands them over so: adapted
        rows are new tensors, where the traced value could be a view such as the first
        token's row of the stream)."""
        pooled = set(self.pool.outputs) if p is self.post and self.pool is not None else set()
        example = [node_example(n) for n in p.inputs]
        # new_empty, not contiguous(): a view with one row counts as contiguous whatever
        # its strides, and Inductor cannot bind a size seen only in a stride.
        return [v.new_empty(v.shape) if n in pooled and isinstance(v, torch.Tensor) else v
                for n, v in zip(p.inputs, example)]

    def _checknode_example(self, c: Any) -> list[Any]:
        """Example inputs of a fused check: its graph values', then fake adapter weights,
        the cut and, from exit 2 on, the previous exit's summary (symbolic batch)."""
        from torch._subclasses.fake_tensor import FakeTensor

        from .checks import summary

        example = [node_example(n) for n in c.inputs]
        fake = next(x.fake_mode for x in example if isinstance(x, FakeTensor))
        width = self.width
        dev = node_example(self.stream[-1]).device  # adapter and cut live with the stream
        with fake:
            example += [torch.empty(shape, dtype=c.adapter_dtype, device=dev)
                        for shape in c.adapter_shapes(width)]
            example.append(torch.empty((), dtype=torch.float32, device=dev))
        if c.takes_prev:
            ref = node_example(self.stream[c.exit - 1] if self.checks_mode == MEAN
                           else self.primary)
            with fake:
                example.append(summary(self.signal, ref))
        return example


def _signal(g: ExitGraph, out: torch.Tensor, prev: torch.Tensor | None,
            token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, summary) per row, or per token when ``token``: the summary is the
    prediction (confidence) or the pooled output (convergence) a quality is measured on."""
    if g.signal == CONFIDENCE:
        logits = out.float()
        if not token and logits.dim() > 2:
            logits = logits[:, -1] if logits.dim() == 3 else logits.flatten(1, -2)[:, -1]
        probs = logits.softmax(-1)
        conf, pred = probs.max(-1)
        if prev is not None:  # a prediction that changed since the last exit ranks lower
            conf = conf - (pred != prev).float()
        return conf, pred
    pooled = out.float().flatten(1, -2).mean(1) if out.dim() > 2 else out.float()
    if prev is None:
        return pooled.new_zeros(pooled.shape[:1]), pooled
    return F.cosine_similarity(pooled, prev, dim=-1), pooled


def _quality(g: ExitGraph, summary: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    if g.signal == CONFIDENCE:
        return (summary == final).float()
    return F.cosine_similarity(summary, final, dim=-1)


def _head_at(g: ExitGraph, env: dict[fx.Node, Any], state: torch.Tensor) -> dict[fx.Node, Any]:
    f = g.stream[-1]
    outs = g.head.fn(*[state if n is f else env[n] for n in g.head.inputs]) \
        if g.head.nodes else [state if o is f else env[o] for o in g.head.outputs]
    return dict(zip(g.head.outputs, outs))


def _pool_at(g: ExitGraph, env: dict[fx.Node, Any], state: torch.Tensor) -> list[torch.Tensor]:
    """The head's pooled values for the stream value ``state``."""
    assert g.pool is not None
    f = g.stream[-1]
    return list(g.pool.fn(*[state if n is f else env[n] for n in g.pool.inputs]))


def _post_at(g: ExitGraph, env: dict[fx.Node, Any], pooled: list[torch.Tensor],
             state: torch.Tensor) -> dict[fx.Node, Any]:
    """The head's outputs from its pooled values (``state`` only lends its shape)."""
    assert g.pool is not None and g.post is not None
    f = g.stream[-1]
    vals = dict(zip(g.pool.outputs, pooled))
    if not g.post.nodes:
        return {o: vals[o] if o in vals else env[o] for o in g.post.outputs}
    # Row-major, as the post piece was compiled for (``ExitGraph._piece_example``).
    outs = g.post.fn(*[vals[n].contiguous() if n in vals else (state if n is f else env[n])
                       for n in g.post.inputs])
    return dict(zip(g.post.outputs, outs))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-3) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * (b.abs().max() + 1.0))


class ExitRunner:
    """Runs one :class:`ExitGraph` for a form runtime (thresholds, calibration records)."""

    def __init__(self, graph: ExitGraph, runtime: Any, state: Any) -> None:
        self.g = graph
        self.runtime = runtime
        self.state = state

    def compile(self, compiler: str) -> None:
        self.g.compile(compiler)

    @property
    def mode(self) -> str:
        """How exits decide: POOLED when the head's pooling region checked out, MEAN when
        the decisive output is the stream itself (a convergence signal reads its token
        mean), else FULL."""
        g = self.g
        if g.pool is not None and self.runtime.pool_ok:
            return POOLED
        return MEAN if g.decides_on_stream else FULL

    def _exit_heads(self, env: dict[fx.Node, Any], k: int, raw: torch.Tensor,
                    adapted: bool, ones: list[torch.Tensor] | None = None
                    ) -> dict[fx.Node, Any]:
        """The head's outputs at exit ``k`` for the rows of ``env`` (stream value ``raw``),
        through the exit's adapter when ``adapted``; pooled first when the head allows
        (``ones``: the pooling of an all-ones stream for these rows, if known)."""
        g, rt = self.g, self.runtime
        if self.mode != POOLED:
            return _head_at(g, env, rt.adapt(k, raw) if adapted and k else raw)
        pooled = _pool_at(g, env, raw)
        if adapted and k and rt.adapters:
            ones = ones or _pool_at(g, env, torch.ones_like(raw))
            pooled = [rt.adapt(k, p, bias_scale=o, pooled=True) for p, o in zip(pooled, ones)]
        return _post_at(g, env, pooled, raw)

    def _decide_on(self, env: dict[fx.Node, Any], k: int, raw: torch.Tensor,
                   adapted: bool, ones: list[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, dict[fx.Node, Any] | None]:
        """(what the signal reads at exit ``k``, the head's outputs when they were
        computed for it). MEAN: the token mean of the (adapted) stream, which equals the
        token mean of the adapted output at a fraction of the cost."""
        if self.mode == MEAN:
            m = raw.float().flatten(1, -2).mean(1) if raw.dim() > 2 else raw.float()
            return (self.runtime.adapt(k, m) if adapted and k else m), None
        heads = self._exit_heads(env, k, raw, adapted, ones)
        return heads[self.g.primary], heads

    def _costs(self, tokens: float) -> ExitCosts:
        rt = self.runtime
        return self.g.unit_costs(tokens, rt.exit_overhead(self.g.width), self.mode)

    def _check_pool(self, env: dict[fx.Node, Any], pooled: list[torch.Tensor],
                    ones: list[torch.Tensor]) -> bool:
        """Whether the head's pooling region commutes with a random channel map on these
        values, and pooling then the rest of the head gives the head's outputs
        (``pooled``, ``ones``: the pooling of the final state and of an all-ones one)."""
        g = self.g
        f = env[g.stream[-1]]
        width = int(f.shape[-1])
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(width, width, generator=gen) / width ** 0.5).to(f.device)
        b = torch.randn(width, generator=gen).to(f.device)
        mapped = _pool_at(g, env, F.linear(f.float(), w, b).to(f.dtype))
        commutes = all(_close(m, F.linear(p.float(), w) + o.float() * b)
                       for m, p, o in zip(mapped, pooled, ones))
        post = _post_at(g, env, pooled, f)
        return commutes and all(_close(post[o], env[o]) for o in g.head.outputs
                                if isinstance(env.get(o), torch.Tensor))

    def _tokens_per_row(self, v: torch.Tensor) -> float:
        rows = int(v.shape[0]) if v.dim() else 1
        return v.numel() / max(rows * max(self.g.width, 1), 1)

    # ------------------------------------------------------------------ entry

    def __call__(self, *args: Any) -> Any:
        g, rt = self.g, self.runtime
        value = self.state.knob(FORM)
        if self.state.calibrating:
            return self._record_states(dict(zip(g.placeholders, args)))
        if rt.recording:
            return self._calibrate(dict(zip(g.placeholders, args)))
        if value >= 1.0 or g.exits < 1:
            return self._dense(dict(zip(g.placeholders, args)))
        threshold = rt.threshold(value)
        if not any(rt.plan(threshold, g.exits)[0]):
            return self._dense(dict(zip(g.placeholders, args)))
        if not g.token_level:
            return self._rows_fast(args, threshold)
        env: dict[fx.Node, Any] = dict(zip(g.placeholders, args))
        first = g.stream[1] if len(g.stream) > 1 else g.stream[-1]
        g.segments[0].run(env)
        tokens = env[first].dim() >= 3 and env[first].shape[1] > 1
        return (self._tokens(env, threshold) if tokens
                else self._rows_mode(env, threshold, started=True))

    def _outputs(self, env: dict[fx.Node, Any]) -> list[Any]:
        return [env[o] if isinstance(o, fx.Node) else o for o in self.g.outputs]

    def _dense(self, env: dict[fx.Node, Any]) -> list[Any]:
        """Every layer, no exit checked: the whole graph in one compiled piece."""
        if self.g.whole is not None:
            self.g.whole.run(env)
            return self._outputs(env)
        for seg in self.g.segments:
            seg.run(env)
        self.g.head.run(env)
        return self._outputs(env)

    # ------------------------------------------------------------ calibration

    def _record_states(self, env: dict[fx.Node, Any]) -> list[Any]:
        """Calibration, first pass: every layer runs; the stream at each exit and the final
        state are recorded (the runtime fits each exit's adapter on them)."""
        g = self.g
        g.segments[0].run(env)
        states = []
        for k in range(1, g.exits + 1):
            states.append(env[g.stream[k]])
            g.segments[k].run(env)
        g.head.run(env)
        rt = self.runtime
        rt.observe_states(states, env[g.stream[-1]])
        if g.pool is not None and rt.pool_ok is not False:
            f = env[g.stream[-1]]
            try:
                final, ones = _pool_at(g, env, f), _pool_at(g, env, torch.ones_like(f))
                rt.pool_ok = self._check_pool(env, final, ones)
            except Exception as e:  # a region that cannot run on its own: no pooled exits
                log.info("early_exit: the head's pooling region does not run alone (%s)", e)
                rt.pool_ok = False
            if rt.pool_ok:
                rt.observe_pooled([*[_pool_at(g, env, s) for s in states], final], ones)
            else:
                log.info("early_exit: exits adapt every token (the head's pooling region "
                         "did not check out)")
        return self._outputs(env)

    def _calibrate(self, env: dict[fx.Node, Any]) -> list[Any]:
        """Calibration, second pass: every layer runs; at each exit the signal and the
        quality the exit would have had are recorded."""
        g = self.g
        g.segments[0].run(env)
        prev = None
        if g.signal == CONVERGENCE:
            prev = _signal(g, self._decide_on(env, 0, env[g.stream[0]], False)[0],
                           None, True)[1]
        signals, summaries = [], []
        rt = self.runtime
        for k in range(1, g.exits + 1):
            raw = env[g.stream[k]]
            out = self._decide_on(env, k, raw, True)[0]
            s, summ = _signal(g, out, prev, g.token_level)
            signals.append(s.flatten())
            summaries.append(summ.reshape(-1) if g.token_level and g.signal == CONFIDENCE
                             else summ)
            prev = summ
            g.segments[k].run(env)
        g.head.run(env)
        _, final = _signal(g, env[g.primary], None, g.token_level)
        if g.token_level and g.signal == CONFIDENCE:
            final = final.reshape(-1)
        quality = [_quality(g, s, final).flatten() for s in summaries]
        if signals:
            rt.observe(g, torch.stack(signals, 1), torch.stack(quality, 1),
                       self._tokens_per_row(env[g.stream[-1]]), self.mode)
        return self._outputs(env)

    # -------------------------------------------------------------- row mode

    def _fused_checks(self) -> list[Any] | None:
        """The layer pieces fused with their exit checks, when they serve this call."""
        g = self.g
        if g.checks and self.mode == g.checks_mode:
            return g.checks
        return None

    def _rows_fast(self, args: tuple[Any, ...], threshold: float) -> list[Any]:
        """Row mode, through the straight-line path (``exit_fast``) for as long as no row
        leaves, then the generic loop from the exit where one does."""
        g = self.g
        fast = self._fast_path(threshold)
        if fast is None:
            return self._rows_mode(dict(zip(g.placeholders, args)), threshold)
        path, adapters, cuts, per_row, checked = fast
        got = path.fn(args, adapters, cuts)
        if got[0] == exit_fast.DONE:
            first = got[2]
            tokens = self._tokens_per_row(first)
            spent = per_row.get(tokens)
            if spent is None:
                spent = per_row[tokens] = self._spent_all_stay(self._costs(tokens), checked)
            rows = int(first.shape[0])
            self._account(spent[0] * rows, rows, rows * (g.exits + 1), spent[1])
            return list(got[1])
        k = got[0]
        return self._rows_mode(dict(zip(path.bail_nodes[k], got[2])), threshold,
                               resume=(k, got[1]))

    def _fast_path(self, threshold: float) -> tuple[Any, ...] | None:
        """(straight-line path, adapters per exit, cuts per exit, per-row cost memo, exits
        checked) for ``threshold``, made once per plan; None where the path does not apply
        (no fused checks, or a compiled piece not yet checked against its wrappers)."""
        rt, g = self.runtime, self.g
        fused = self._fused_checks()
        if fused is None:
            return None
        key = (g, threshold, torch.is_grad_enabled(), id(fused))
        got = rt._fast.get(key, False)
        if got is not False:
            return got
        fire, checked = rt.plan(threshold, g.exits)
        pieces = [fused[k] if c else g.segments[k] for k, c in enumerate(checked)]
        if not exit_fast.ready([p.fn for p in [*pieces, g.segments[-1], g.head]]):
            return None  # the generic loop runs (and checks) them first
        path = exit_fast.build(g, fused, checked, self._zeros)
        if path is None:
            rt._fast[key] = None
            return None
        adapters, cuts = [], []
        for k in range(1, g.exits + 1):
            c = fused[k - 1]
            if not checked[k - 1]:
                adapters.append(())
                cuts.append(rt.never)
                continue
            adapters.append(rt.adapter_args(k, g.width, c.adapter_dtype, self.mode == POOLED,
                                            c.fold))
            can = fire[k - 1] and (k == 1 or checked[k - 2])
            cuts.append(rt.cut(k, threshold) if can else rt.never)
        got = rt._fast[key] = (path, tuple(adapters), tuple(cuts), {}, checked)
        return got

    def _zeros(self, check: Any, rows: int) -> torch.Tensor:
        """The previous summary a check takes when the previous exit was not evaluated."""
        return torch.zeros((rows, *check.summary_shape), dtype=check.summary_dtype,
                           device=self.runtime.device)

    def _spent_all_stay(self, costs: ExitCosts, checked: list[bool]) -> tuple[float, float]:
        """(cost per row, head cost) of a call in which every row runs every layer and
        the exits ``checked`` are evaluated."""
        g = self.g
        spent = sum(g.segment_cost) + costs.head + sum(checked) * costs.check
        if g.signal == CONVERGENCE and checked[0]:
            spent += costs.first
        return spent, costs.head

    def _rows_mode(self, env: dict[fx.Node, Any], threshold: float,
                   started: bool = False, resume: tuple[int, Any] | None = None
                   ) -> list[Any]:
        """Rows leave the batch at the exit where their quality reaches ``threshold``;
        ``started``: segment 0 has already run; ``resume``: ``(k, outputs)``, the
        straight-line path ran the layers up to exit ``k`` (``env`` holds what they made)
        and exit ``k``'s fused check gave ``outputs``, in which a row leaves."""
        g = self.g
        parts: dict[fx.Node, list[tuple[torch.Tensor, Any]]] = {}
        done: set[fx.Node] = set()
        out_nodes = [o for o in g.outputs if isinstance(o, fx.Node)]
        rt = self.runtime
        fire, checked = rt.plan(threshold, g.exits)
        fused = self._fused_checks()
        alive = torch.arange(0)
        total = depth = 0  # rows in the batch; layers run, summed over rows
        spent = 0.0
        costs: ExitCosts | None = None
        prev = summ = None
        ones_all: list[torch.Tensor] | None = None
        finished = False
        for k in range(1, g.exits + 1):
            sig = heads = leave = None
            anyone = False
            ran = resume is not None and k < resume[0]  # in the straight line; none left
            if resume is not None and k == resume[0]:
                assert fused is not None
                sig, summ, leave, any_t, heads = fused[k - 1].unpack(env, resume[1])
                anyone = bool(any_t)
                heads = heads or None
            elif not ran and (k > 1 or not started):
                if fused is not None and checked[k - 1]:  # layer k - 1 and exit k's check
                    c = fused[k - 1]
                    adapter = rt.adapter_args(k, g.width, c.adapter_dtype,
                                              self.mode == POOLED, c.fold)
                    # No reference (k > 1, previous exit unchecked): the exit cannot fire.
                    can = fire[k - 1] and (prev is not None or k == 1)
                    cut = rt.cut(k, threshold) if can else rt.never
                    sig, summ, leave, any_t, heads = c.run(env, adapter, cut, prev,
                                                           int(alive.numel()))
                    anyone = bool(any_t)
                    heads = heads or None
                else:
                    g.segments[k - 1].run(env)
            if k == 1:
                b0 = env[g.stream[1]]
                total = int(b0.shape[0])
                alive = torch.arange(total, device=b0.device)
                costs = self._costs(self._tokens_per_row(b0))
                if g.signal == CONVERGENCE and checked[0]:
                    spent += costs.first * total
                    if sig is None and not ran:  # the exit-0 reference (else in-graph)
                        prev = _signal(g, self._decide_on(env, 0, env[g.stream[0]], False)[0],
                                       None, False)[1]
            assert costs is not None
            spent += g.segment_cost[k - 1] * alive.numel()
            depth += alive.numel()
            if not checked[k - 1]:  # this exit cannot fire at this threshold, nor the next
                prev = None
                continue
            if ran:
                spent += costs.check * alive.numel()
                continue
            raw = env[g.stream[k]]
            if sig is None:
                if ones_all is None and self.mode == POOLED and rt.adapters:
                    ones_all = _pool_at(g, env, torch.ones_like(raw))  # bias scale, per call
                out, heads = self._decide_on(env, k, raw, True, ones_all)
                sig, summ = _signal(g, out, prev, False)
            assert summ is not None
            spent += costs.check * alive.numel()
            if leave is None:
                leave = rt.leaves(k, sig, threshold)
                if not fire[k - 1]:
                    leave = torch.zeros_like(leave)
                anyone = bool(leave.any())
            if anyone and g.static_rows and not bool(leave.all()):
                anyone = False
            if anyone:
                gone = leave.nonzero().flatten()
                stay = (~leave).nonzero().flatten()
                # Outputs computed so far are final for every row still here.
                for o in out_nodes:
                    if o in env and o not in done:
                        parts.setdefault(o, []).append((alive, env[o]))
                        done.add(o)
                left = take_rows(env, g.batch, g.batch_ints, gone)
                if heads is not None:
                    outs = {o: v.index_select(0, gone) if o in g.batch else v
                            for o, v in heads.items()}
                else:
                    outs = self._exit_heads(left, k, left[g.stream[k]], True)
                    spent += costs.leave * gone.numel()
                for o, v in outs.items():
                    if o in out_nodes and o not in done:
                        parts.setdefault(o, []).append((alive[gone], v))
                h = None
                for j in range(k, g.exits + 1):
                    fill = g.fills[j]
                    if fill is None:
                        continue
                    if h is None:  # the exit state later layers' outputs are filled from
                        h = rt.adapt(k, left[g.stream[k]])
                    fenv = dict(left)
                    fenv[g.stream[j]] = h
                    fill.run(fenv)
                    spent += g.fill_cost[j] * gone.numel()
                    for o in fill.outputs:
                        if o in out_nodes and o not in done:
                            parts.setdefault(o, []).append((alive[gone], fenv[o]))
                alive = alive[stay]
                if alive.numel() == 0:
                    finished = True
                    break
                env = take_rows(env, g.batch, g.batch_ints, stay)
                summ = summ.index_select(0, stay)
                if ones_all is not None:
                    ones_all = [o.index_select(0, stay) for o in ones_all]
            prev = summ
        assert costs is not None
        if not finished:
            g.segments[g.exits].run(env)
            spent += g.segment_cost[g.exits] * alive.numel()
            depth += alive.numel()
            g.head.run(env)
            spent += costs.head * alive.numel()
        for o in out_nodes:
            if o in done or o not in env:
                continue
            parts.setdefault(o, []).append((alive, env[o]))
        self._account(spent, total, depth, costs.head)
        return [self._assemble(o, parts, total, env) if isinstance(o, fx.Node) else o
                for o in g.outputs]

    def _assemble(self, o: fx.Node, parts: dict[fx.Node, list[tuple[torch.Tensor, Any]]],
                  total: int, env: dict[fx.Node, Any]) -> Any:
        got = parts.get(o)
        if not got:
            return env.get(o)
        if o not in self.g.batch:
            return got[-1][1]
        if len(got) == 1 and got[0][0].numel() == total:
            return got[0][1]
        first = got[0][1]
        out = first.new_empty((total, *first.shape[1:]))
        for rows, v in got:
            out.index_copy_(0, rows, v)
        return out

    # ------------------------------------------------------------ token mode

    def _tokens(self, env: dict[fx.Node, Any], threshold: float) -> list[Any]:
        g = self.g
        frozen = None
        kept = prev = None
        b, s = env[g.stream[1]].shape[:2]
        depth = torch.zeros(b, s, device=env[g.stream[1]].device)
        fire, checked = self.runtime.plan(threshold, g.exits)
        for k in range(1, g.exits + 1):
            node = g.stream[k]
            h = env[node]
            if frozen is not None:
                h = torch.where(frozen, kept, h)
                env[node] = h
            if not checked[k - 1]:
                prev = None
                depth += 1.0 if frozen is None else (~frozen.squeeze(-1)).float()
                g.segments[k].run(env)
                continue
            ha = self.runtime.adapt(k, h)
            out = _head_at(g, env, ha)[g.primary]
            if out.shape[:2] != (b, s):
                # The head scores only some positions (e.g. the last one while prefilling
                # for generate()): no per-token signal, so every token runs every layer.
                for seg in g.segments[k:]:
                    seg.run(env)
                g.head.run(env)
                return self._outputs(env)
            sig, prev = _signal(g, out, prev, True)
            leave = self.runtime.leaves(k, sig.flatten(), threshold).view(b, s)
            leave = leave.unsqueeze(-1) & fire[k - 1]
            if frozen is None:
                frozen, kept = leave, torch.where(leave, ha, torch.zeros_like(ha))
            else:
                kept = torch.where(leave & ~frozen, ha, kept)
                frozen = frozen | leave
            depth += (~frozen.squeeze(-1)).float()
            g.segments[k].run(env)
        f = g.stream[-1]
        if frozen is not None:
            env[f] = torch.where(frozen, kept, env[f])
        g.head.run(env)
        dense = sum(g.segment_cost) + g.head_cost
        spent = dense + sum(checked) * (g.head_cost + self.runtime.exit_overhead(g.width))
        _stats.record_ratio("exit_depth", float(depth.sum()) + b * s, b * s * (g.exits + 1))
        _stats.record_saving_fraction(1.0 - spent / dense)
        return self._outputs(env)

    def _account(self, spent: float, rows: int, depth: int, head: float) -> None:
        g = self.g
        dense = (sum(g.segment_cost) + head) * rows
        _stats.record_ratio("exit_depth", depth, rows * (g.exits + 1))
        _stats.record_saving_fraction(1.0 - spent / dense if dense else 0.0)
