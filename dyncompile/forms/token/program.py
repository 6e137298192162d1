"""The runner of the ``token`` form: pieces one after another, tokens merged between them.

At a budget below 1.0 the runner runs the pieces of a :class:`TokenGraph` in order.
After each piece that holds attention it merges the most similar tokens
(bipartite soft matching on the stream leaving it, or that attention's keys;
the ``token_merge`` ops): the
stream becomes the size-weighted means of the merged groups, and every
per-token input of later pieces (masks, positions) takes its kept tokens' rows.
Attention pieces add ``log(size)`` to their scores (proportional attention), so
a merged token keeps the weight of the tokens it stands for. Tokens that differ
in a mask (padding and real tokens) never merge; the first token never merges.
Before the head, each original position takes its group's row again (unmerge),
so the head and the outputs keep their shapes. At 1.0 the whole graph runs as
one compiled piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from ...core import stats as _stats
from ...ops.token_merge import cpu as _token_cpu
from ...program.pieces import Piece
from ...program.rows import fixed_layouts, node_example
from .schedule import MIN_TOKENS, keep_ratio, spent, token_counts

FORM = "token"


@dataclass(eq=False)
class TokenGraph:
    """A graph cut at its residual blocks for token merging.

    ``pieces[j]`` runs residual block ``j`` (piece 0 also everything before the first
    block); ``stream[j]`` is the stream value entering block ``j`` and ``stream[-1]``
    the final state, which the head reads. ``keys[j]`` is the node whose value the
    merge after piece ``j`` matches on (None: no merge after it), ``biased[j]`` whether
    piece ``j`` takes the proportional-attention bias as its last input.
    ``token_inputs[j]`` maps each input of piece ``j`` sized by the token count to the
    dims that are; ``masks`` are the values whose differences keep tokens apart.
    """

    placeholders: list[fx.Node]
    outputs: list[Any]
    stream: list[fx.Node]
    pieces: list[Piece]
    head: Piece
    whole: Piece
    keys: list[fx.Node | None]
    biased: list[bool]
    token_inputs: list[dict[fx.Node, list[int]]]
    size_ints: list[dict[fx.Node, sympy.Expr]]
    masks: list[fx.Node]
    tokens_symbol: sympy.Symbol
    linear_cost: list[float]      # FLOPs per token of each piece
    quadratic_cost: list[float]   # FLOPs per token pair of each piece (attention)
    head_cost: float
    protect_first: bool = True
    compiled: bool = False
    graphs: int = 0
    bias_dtype: dict[int, torch.dtype] = field(default_factory=dict)

    @property
    def merge_after(self) -> list[bool]:
        return [k is not None for k in self.keys]

    def compile(self, compiler: str) -> None:
        """Compile every piece with Inductor for the symbolic sizes dynamo recorded (the
        token count included), so one compiled piece serves every token count."""
        if compiler == "eager" or self.compiled:
            return
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        from ...program.direct_call import DirectCall

        with inductor_config.patch(fx_graph_cache=False):
            for j, p in enumerate([*self.pieces, self.head, self.whole]):
                if not p.nodes:
                    continue
                example = [node_example(n) for n in p.inputs]
                if j < len(self.pieces) and self.biased[j]:
                    example.append(self.bias_example(j))
                with inductor_config.patch(size_asserts=not fixed_layouts(p.inputs, example)):
                    p.fn = DirectCall(compile_fx(p.module, example), p.module)
                self.graphs += 1
        self.compiled = True

    def bias_example(self, j: int) -> torch.Tensor:
        """A fake [rows, 1, 1, tokens] bias with the graph's symbolic sizes."""
        ref = node_example(self.stream[j])
        with ref.fake_mode:
            return torch.empty((ref.shape[0], 1, 1, ref.shape[1]),
                               dtype=self.bias_dtype.get(j, ref.dtype), device=ref.device)


@dataclass
class _Tokens:
    """Where the tokens stand: ``index[i, t]`` is the current position of original token
    ``t``, ``rep[i, k]`` the original position of current token ``k``, ``size[i, k]`` how
    many original tokens it stands for."""

    index: torch.Tensor
    rep: torch.Tensor
    size: torch.Tensor
    group: torch.Tensor | None = None
    step: int = 0


class TokenRunner:
    """Runs one :class:`TokenGraph` at the budget of the call."""

    def __init__(self, graph: TokenGraph, runtime: Any, state: Any) -> None:
        self.g = graph
        self.runtime = runtime
        self.state = state
        # Per-call work that depends only on the sizes and the budget, kept:
        # (tokens, budget) -> tokens entering each piece; (size expr, sizes) -> int.
        self._plans: dict[tuple[int, float], list[int]] = {}
        self._ints: dict[tuple[Any, tuple], int] = {}
        _token_cpu.kernel_available()  # registers the ops (and their C++ CPU kernels)

    def _plan(self, tokens: int, value: float) -> list[int]:
        key = (tokens, value)
        plan = self._plans.get(key)
        if plan is None:
            g = self.g
            if len(self._plans) > 256:
                self._plans.clear()
            ratio = keep_ratio(value, tokens, g.merge_after, g.linear_cost, g.quadratic_cost,
                               g.head_cost)
            plan = self._plans[key] = token_counts(tokens, ratio, g.merge_after)
        return plan

    def _int(self, expr: Any, binding: dict[sympy.Symbol, int]) -> int:
        """``expr`` (a size: int or sympy expression) at the sizes of this call."""
        if isinstance(expr, int):
            return expr
        key = (expr, tuple(sorted((str(k), v) for k, v in binding.items())))
        value = self._ints.get(key)
        if value is None:
            if len(self._ints) > 4096:
                self._ints.clear()
            value = self._ints[key] = int(sympy.sympify(expr).subs(binding))
        return value

    def compile(self, compiler: str) -> None:
        self.g.compile(compiler)

    def __call__(self, *args: Any) -> Any:
        g = self.g
        env: dict[fx.Node, Any] = dict(zip(g.placeholders, args))
        value = self.state.knob(FORM)
        if value >= 1.0:
            g.whole.run(env)
            return self._outputs(env)
        return self._merged(env, value)

    def _outputs(self, env: dict[fx.Node, Any]) -> list[Any]:
        return [env[o] if isinstance(o, fx.Node) else o for o in self.g.outputs]

    # ------------------------------------------------------------------ merging

    def _merged(self, env: dict[fx.Node, Any], value: float) -> list[Any]:
        g = self.g
        binding = self._binding(env)
        ref = node_example(g.stream[0])
        rows, tokens = (self._int(_expr(s), binding) for s in ref.shape[:2])
        plan = self._plan(tokens, value)
        dev = env[next(n for n in g.placeholders if isinstance(env[n], torch.Tensor))].device
        ar = torch.arange(tokens, device=dev).expand(rows, tokens)
        tok = _Tokens(index=ar, rep=ar, size=torch.ones(rows, tokens, device=dev))
        cur: dict[fx.Node, Any] = {}   # values made by the pieces (the stream: merged)
        reduced: dict[tuple[fx.Node, int], torch.Tensor] = {}
        counts = []
        for j, piece in enumerate(g.pieces):
            n = int(tok.rep.shape[1])
            counts.append(n)
            args = []
            for u in piece.inputs:
                v = cur[u] if u in cur else env[u]
                if tok.step and u in g.token_inputs[j]:
                    key = (u, tok.step)
                    if key not in reduced:
                        reduced[key] = _take(v, g.token_inputs[j][u], tok.rep)
                    v = reduced[key]
                elif tok.step and u in g.size_ints[j]:
                    v = self._int(g.size_ints[j][u], {**binding, g.tokens_symbol: n})
                args.append(v)
            if g.biased[j]:
                args.append(tok.size.log().to(g.bias_dtype.get(j, torch.float32))[:, None, None])
            cur.update(zip(piece.outputs, piece.fn(*args)))
            if g.keys[j] is not None and j + 1 < len(plan):
                self._merge(j, env, cur, tok, n - plan[j + 1])
        final = cur[g.stream[-1]] if g.stream[-1] in cur else env[g.stream[-1]]
        if tok.step:
            final = torch.ops.dyncompile.token_unmerge(final, tok.index)
        env.update(cur)
        env[g.stream[-1]] = final
        g.head.run(env)
        self._account(tokens, counts, rows)
        self.runtime.last_tokens = counts
        self.runtime.last_index, self.runtime.last_rep = tok.index, tok.rep
        return self._outputs(env)

    def _merge(self, j: int, env: dict[fx.Node, Any], cur: dict[fx.Node, Any],
               tok: _Tokens, r: int) -> None:
        """Merge ``r`` tokens of the stream leaving piece ``j`` (fewer where the groups or
        the minimum token count do not allow them)."""
        g = self.g
        n = int(tok.rep.shape[1])
        r = min(r, n - MIN_TOKENS)
        if r <= 0:
            return
        if tok.group is None:
            tok.group = self._groups(env, cur, tok)
        group = tok.group.gather(1, tok.rep)
        best, partner = torch.ops.dyncompile.token_match(cur[g.keys[j]], group,
                                                         g.protect_first)
        r = min(r, int((best > float("-inf")).sum(1).min()))
        if r <= 0:
            return
        slot, rep = torch.ops.dyncompile.token_assign(best, partner, r, n)
        stream = g.stream[j + 1]
        x = cur[stream] if stream in cur else env[stream]
        cur[stream], tok.size = torch.ops.dyncompile.token_merge(x, tok.size, slot, n - r)
        tok.index = slot.gather(1, tok.index)
        tok.rep = tok.rep.gather(1, rep)
        tok.step += 1

    def _groups(self, env: dict[fx.Node, Any], cur: dict[fx.Node, Any],
                tok: _Tokens) -> torch.Tensor:
        """[rows, tokens] ids: tokens with equal values in every mask share an id."""
        g = self.g
        rows, tokens = tok.index.shape
        cols = []
        for m in g.masks:
            v = cur[m] if m in cur else env[m]
            while v.dim() > 2:  # each key token's value, seen from the first query
                v = v.select(1, 0)
            cols.append(v.expand(rows, tokens).float())
        if not cols:
            return torch.zeros(rows, tokens, dtype=torch.long, device=tok.index.device)
        sig = torch.stack(cols, -1).reshape(rows * tokens, len(cols))
        return torch.unique(sig, dim=0, return_inverse=True)[1].view(rows, tokens)

    def _binding(self, env: dict[fx.Node, Any]) -> dict[sympy.Symbol, int]:
        """The sizes bound to the graph's symbols in this call."""
        out: dict[sympy.Symbol, int] = {}
        for n in self.g.placeholders:
            ex = node_example(n)
            v = env[n]
            if isinstance(ex, torch.SymInt) and isinstance(ex.node.expr, sympy.Symbol):
                out[ex.node.expr] = int(v)
            elif isinstance(ex, torch.Tensor) and isinstance(v, torch.Tensor):
                for s, real in zip(ex.shape, v.shape):
                    if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                        out[s.node.expr] = int(real)
        return out

    def _account(self, tokens: int, counts: list[int], rows: int) -> None:
        g = self.g
        dense = spent(tokens, [tokens] * len(counts), g.linear_cost, g.quadratic_cost,
                      g.head_cost)
        used = spent(tokens, counts, g.linear_cost, g.quadratic_cost, g.head_cost)
        _stats.record_ratio("tokens", float(sum(counts)) * rows, float(tokens * len(counts)) * rows)
        _stats.record_saving_fraction(1.0 - used / dense if dense else 0.0)


def _expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _take(v: torch.Tensor, dims: list[int], rep: torch.Tensor) -> torch.Tensor:
    """``v`` with only the kept tokens (original positions ``rep`` [rows, n]) along each
    of its token ``dims`` (dim 0 is the batch, expanded when it broadcasts)."""
    rows, n = rep.shape
    if v.shape[0] != rows:
        v = v.expand(rows, *v.shape[1:])
    for d in dims:
        idx = rep.view(rows, *([1] * (d - 1)), n, *([1] * (v.dim() - d - 1)))
        full = list(v.shape)
        full[d] = n
        v = v.gather(d, idx.expand(full))
    return v
