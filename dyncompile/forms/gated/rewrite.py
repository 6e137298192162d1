"""Form ``gated``: training-free activation sparsity for the linears of FFN and attention blocks.

Every linear inside a detected FFN or attention block becomes one op,

    y = dyncompile::gated_linear(x, W_t, b, state, site)   # skip rows of W_t where |x| < thr

whose threshold is read at run time from the budget in force. With
``form_options={"gated": {"glu": "cats"}}`` the up and down projections of a
GLU FFN become instead (CATS)

    y = dyncompile::cats_glu(act(gate(x)), x, W_up, b_up, W_down_t, b_down, state, site)

which drops hidden channels whose gate activation is small (the gate
projection stays dense). Thresholds come from |x| quantiles gathered on
calibration data through the graph itself (no hooks). The budget maps to
per-site sparsities so the rewritten linears spend about ``budget`` of their
dense cost: the same keep fraction everywhere (``allocation="uniform"``,
default), a greedy allocation that spends the sparsity where the estimated
output error grows least per FLOP saved (``allocation="greedy"``), or TEAL's
allocation on each block's real output (``allocation="block"``: while
calibrating, the block's inputs are recorded through the graph's taps; each
block is then re-run on them for every candidate step). Budget 1.0 gives
threshold 0, the dense model.

Weights the kernels read transposed are switched once, in place, to the
transposed memory order (same values and shape), so an active channel is one
contiguous row and no weight is ever copied per call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ...core.options import choice
from ...core.registry import register_form
from ...passes.base import Pass, PassContext
from ...passes.blocks import FFNBlock
from ...passes.graph_utils import eliminate_dead_code, is_param, shape_of, to_nx
from ...passes.linears import LinearSite
from ...passes.splice import LINEAR_FLOPS, copy_meta, glu_product, replaced_node
from ...passes.weights import Weights
from ...program.pieces import build_piece
from . import ops as _ops  # noqa: F401  (registers gated_linear and cats_glu)
from .allocation import GreedyPath, SiteCost, StepPath, block_path, uniform_sparsity
from .blocks import BlockProbe, block_region
from .calibration import MagnitudeSample, RowSample, interpolate

log = logging.getLogger("dyncompile")

LEVELS = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)
ERROR_LEVELS = LEVELS[::5]  # 0, 0.05, ..., 0.95: the greedy allocation's steps
BLOCK_FLOOR = 0.1  # the block allocation's path stops once a block spends this little
BLOCK_CHECKS = (0.5, 0.3)  # budgets at which a block's path is compared with uniform


@dataclass(frozen=True)
class GatedOptions:
    """``form_options={"gated": {...}}``.

    glu: "teal" (every linear gated on its own input) or "cats" (a GLU FFN becomes one
        ``cats_glu`` op thresholding the gate activation).
    allocation: "uniform" (the same keep fraction at every site), "greedy" (sparsity
        where calibration estimates the least output error per FLOP saved, from each
        site's inputs alone) or "block" (TEAL's: within each FFN and attention block,
        greedy steps on the error of the block's output, measured by running the block
        on recorded inputs; every block spends the budget).
    layout: "input_major" (weights switched once, in place, to input-major memory
        order) or "as_is".
    criterion: which input channels a linear drops: "magnitude" (smallest |x_i|, as
        TEAL) or "wina" (smallest |x_i| * ||W[:, i]||, the norm of the weight column the
        channel feeds, as WINA). Applies to ``gated_linear`` sites; ``cats_glu``
        thresholds the gate activation.
    scope: "blocks" (the linears of detected FFN and attention blocks) or "all" (every
        linear with a parameter weight, e.g. attention projections around an engine's
        own attention op, which no attention block describes).
    """

    glu: str = choice("teal", "cats")
    allocation: str = choice("uniform", "greedy", "block")
    layout: str = choice("input_major", "as_is")
    criterion: str = choice("magnitude", "wina")
    scope: str = choice("blocks", "all")


class GatedRuntime:
    """Calibration samples, per-site threshold tables and the budget allocation."""

    def __init__(self, allocation: str = "uniform", criterion: str = "magnitude") -> None:
        self.allocation = allocation
        self.criterion = criterion
        self.costs: dict[str, SiteCost] = {}
        # site -> per-channel factor of |x| in the criterion (``wina``: weight column norms)
        self.scales: dict[str, torch.Tensor] = {}
        self.channel_weight: dict[str, torch.Tensor] = {}
        self.samples: dict[str, MagnitudeSample] = {}
        self.rows: dict[str, RowSample] = {}
        self.tables: dict[str, torch.Tensor] = {}
        self.errors: dict[str, torch.Tensor] = {}
        self.path: GreedyPath | None = None
        # allocation="block": each block's recorded inputs and its path
        self.blocks: dict[str, BlockProbe] = {}
        self.block_paths: dict[str, StepPath] = {}
        # block -> budget -> (its path's output error, uniform's) on the recorded inputs
        self.block_checks: dict[str, dict[float, tuple[float, float]]] = {}
        # site -> threshold in force regardless of the budget (measuring one setting)
        self.override: dict[str, float] | None = None
        self._cache: dict[float, dict[str, float]] = {}  # budget -> site -> threshold

    @property
    def calibrated(self) -> bool:
        return bool(self.tables) and set(self.samples) <= set(self.tables)

    def register(self, site: str, cost: float, fixed: float = 0.0,
                 channel_weight: torch.Tensor | None = None) -> None:
        """Declare a site: dense FLOPs per token, fixed share, squared weight norm per channel."""
        self.costs[site] = SiteCost(cost, fixed)
        if channel_weight is not None:
            self.channel_weight[site] = channel_weight.detach().float().cpu()

    def observe(self, site: str, gate: torch.Tensor, value: torch.Tensor | None = None) -> None:
        seed = sum(map(ord, site)) % (1 << 31)
        scale = self.scales.get(site)
        if scale is not None:  # the criterion's score, |x| * scale; the value stays x
            value = gate if value is None else value
            gate = gate.detach().float().abs() * scale.to(gate.device)
        self.samples.setdefault(site, MagnitudeSample(seed=seed)).add(gate)
        if self.allocation == "greedy":
            self.rows.setdefault(site, RowSample(seed=seed)).add(
                gate, value if value is not None else gate)

    def finalize(self) -> None:
        for site, sample in self.samples.items():
            q = sample.quantiles(LEVELS).double()
            q[0] = 0.0
            self.tables[site] = torch.cummax(q, 0).values
        if self.allocation == "greedy":
            self.errors = {s: self._error_curve(s) for s in self.tables}
            self.path = GreedyPath({s: self.costs.get(s, SiteCost()) for s in self.errors},
                                   self.errors, ERROR_LEVELS)
        if self.allocation == "block":
            self._fit_blocks()
        self._cache.clear()

    def _fit_blocks(self) -> None:
        from tqdm.auto import tqdm

        costs = {s: self.costs.get(s, SiteCost()) for s in self.tables}
        todo = {k: p for k, p in self.blocks.items()
                if p.calls and set(p.sites) <= set(self.tables)}
        if len(todo) < len(self.blocks) or not self.blocks:
            log.warning("gated: allocation='block' found recorded inputs for %d of %d blocks "
                        "(none when another form runs the graph in pieces); the others "
                        "keep the uniform allocation", len(todo), len(self.blocks))
        levels = len(ERROR_LEVELS) - 1
        with tqdm(total=sum(len(p.sites) ** 2 * levels for p in todo.values()),
                  desc="gated: block allocation", leave=False, disable=not todo) as bar:
            for key, probe in todo.items():
                path = self.block_paths[key] = block_path(
                    costs, probe.sites, ERROR_LEVELS,
                    lambda alloc, probe=probe: self.block_error(probe, alloc),
                    floor=BLOCK_FLOOR, progress=lambda: bar.update(1))
                # what the path gained: its error against uniform's at two budgets
                self.block_checks[key] = {
                    b: (self.block_error(probe, path.sparsity(b)),
                        self.block_error(probe, uniform_sparsity(
                            {s: costs[s] for s in probe.sites}, b, float(LEVELS[-1]))))
                    for b in BLOCK_CHECKS}
                probe.calls.clear()  # the recorded inputs are not needed any more
                probe.targets.clear()
            bar.update(bar.total - bar.n)

    def block_error(self, probe: BlockProbe, alloc: dict[str, float]) -> float:
        """Relative squared error of the block's output on its recorded inputs with each
        site at sparsity ``alloc[site]`` (sites not named: dense)."""
        self.override = {s: interpolate(LEVELS, self.tables[s], v) if v > 0 else 0.0
                         for s, v in alloc.items()}
        try:
            return probe.error()
        finally:
            self.override = None

    def _error_curve(self, site: str) -> torch.Tensor:
        """Estimated relative output error of the site at each of ERROR_LEVELS."""
        rows = self.rows[site]
        g, v = rows.gate.abs(), rows.value
        w = self.channel_weight.get(site)
        energy = v.square() * (w if w is not None and w.numel() == v.shape[-1] else 1.0)
        total = float(energy.sum()) or 1.0
        out = []
        for level in ERROR_LEVELS.tolist():
            thr = interpolate(LEVELS, self.tables[site], level)
            out.append(float(energy[g < thr].sum()) / total if thr > 0 else 0.0)
        return torch.tensor(out, dtype=torch.float64)

    def sparsity(self, budget: float) -> dict[str, float]:
        """Per-site sparsity for a budget under the configured allocation."""
        if budget >= 1.0:
            return dict.fromkeys(self.tables, 0.0)
        if self.path is not None:
            return self.path.sparsity(budget)
        if self.block_paths:
            alloc: dict[str, float] = {}
            for path in self.block_paths.values():
                alloc.update(path.sparsity(budget))
            rest = {s: self.costs.get(s, SiteCost()) for s in self.tables if s not in alloc}
            alloc.update(uniform_sparsity(rest, budget, float(LEVELS[-1])) if rest else {})
            return alloc
        return uniform_sparsity({s: self.costs.get(s, SiteCost()) for s in self.tables},
                                budget, float(LEVELS[-1]))

    def threshold(self, site: str, budget: float) -> float:
        if self.override is not None:
            return self.override.get(site, 0.0)
        if budget >= 1.0:
            return 0.0
        per_site = self._cache.get(budget)
        if per_site is None:
            if len(self._cache) > 64:
                self._cache.clear()
            alloc = self.sparsity(budget)
            per_site = self._cache[budget] = {
                s: interpolate(LEVELS, table, alloc.get(s, 1.0 - budget))
                for s, table in self.tables.items()}
        value = per_site.get(site)
        if value is None:
            raise RuntimeError(f"gated: site {site!r} was not calibrated; run calibration "
                               "batches through optimize(..., calibration=...) first")
        return value

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{s}/table": t for s, t in self.tables.items()}
        tensors.update({f"{s}/errors": e for s, e in self.errors.items()})
        tensors.update({f"{s}/scale": t for s, t in self.scales.items()})
        tensors.update({f"{k}/path": p.to_tensor() for k, p in self.block_paths.items()})
        meta = {"allocation": self.allocation, "criterion": self.criterion,
                "costs": {s: [c.cost, c.fixed] for s, c in self.costs.items()},
                "blocks": {k: p.sites for k, p in self.block_paths.items()}}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                model: torch.nn.Module) -> None:
        self.allocation = meta["allocation"]
        self.criterion = meta.get("criterion", "magnitude")
        self.costs = {s: SiteCost(*c) for s, c in meta["costs"].items()}
        for key, t in tensors.items():
            site, kind = key.rsplit("/", 1)
            if kind == "scale":
                self.scales[site] = t.float()
            elif kind == "path":
                self.block_paths[site] = StepPath.from_tensor(
                    meta["blocks"][site], ERROR_LEVELS.tolist(), t)
            else:
                (self.tables if kind == "table" else self.errors)[site] = t.double()
        if self.allocation == "greedy":
            self.path = GreedyPath({s: self.costs.get(s, SiteCost()) for s in self.errors},
                                   self.errors, ERROR_LEVELS)
        self._cache.clear()


class _CatsMatch:
    """A GLU FFN in the shape CATS rewrites: down(a * up(x)) with a = act(gate(x))."""

    def __init__(self, block: FFNBlock, up: LinearSite, act: fx.Node) -> None:
        self.block, self.up, self.act = block, up, act

    @property
    def down(self) -> LinearSite:
        assert self.block.down is not None
        return self.block.down


def _block_linears(block: Any) -> list[LinearSite]:
    """The linears of an FFN block (up projections, gate included, and down) or of an
    attention block (q, k, v, o)."""
    return [s for s in [*getattr(block, "up", []), getattr(block, "down", None),
                        getattr(block, "q", None), getattr(block, "k", None),
                        getattr(block, "v", None), getattr(block, "o", None)] if s is not None]


def _match_cats(block: FFNBlock) -> _CatsMatch | None:
    parts = glu_product(block)
    if parts is None:
        return None
    up, act = parts
    mul = block.down.x
    if len(up.output.users) != 1 or len(mul.users) != 1:
        return None
    if shape_of(act) is None or shape_of(act) != shape_of(up.output):
        return None
    return _CatsMatch(block, up, act)


@register_form
class GatedForm(Pass):
    """Rewrite FFN and attention linears into budget-controlled sparse linears."""

    name = "gated"
    stage = 20
    Options = GatedOptions
    looks_for = "linears inside detected FFN and attention blocks"
    mutates_weights = True
    runtime = GatedRuntime

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        assert ctx.blocks is not None and ctx.state is not None
        opts: GatedOptions = ctx.config.options_for(self.name)
        runtime = ctx.state.form(self.name,
                                 lambda: GatedRuntime(opts.allocation, opts.criterion))
        cats = []
        if opts.glu == "cats":
            cats = [m for m in map(_match_cats, ctx.blocks.ffn) if m is not None
                    and not any(ctx.owner(n) for n in m.block.nodes)]
        taken = {id(s) for m in cats for s in (m.up, m.down, m.block.gate)}
        sites: list[LinearSite] = []
        for block in [*ctx.blocks.ffn, *ctx.blocks.attention]:
            for s in _block_linears(block):
                if (s not in sites and id(s) not in taken
                        and ctx.owner(s.node) is None and ctx.owner(s.output) is None):
                    sites.append(s)
        if opts.scope == "all":
            sites += [s for s in ctx.blocks.linears.values()
                      if s not in sites and id(s) not in taken and is_param(s.weight)
                      and ctx.owner(s.node) is None and ctx.owner(s.output) is None]
        self._weights = Weights(gm, ctx, convert=opts.layout == "input_major")
        new: dict[int, tuple[str, fx.Node]] = {}  # id(site) -> (site name, its op node)
        for site in sites:
            new[id(site)] = self._rewrite_linear(gm, site, ctx.state.id, runtime)
            ctx.claim(self.name, [site.node, site.output])
        for m in cats:
            new[id(m.down)] = self._rewrite_cats(gm, m, ctx.state.id, runtime)
            new[id(m.up)] = new[id(m.down)]
        eliminate_dead_code(gm.graph)
        gm.recompile()
        if opts.allocation == "block":
            self._probe_blocks(gm, ctx, runtime, new)
        gm.meta["dyn_gated_sites"] = [s.weight_name for s in sites]
        gm.meta["dyn_cats_sites"] = [m.down.weight_name for m in cats]
        ctx.log.append(f"gated: rewrote {len(sites)} linears"
                       + (f" and {len(cats)} GLU FFNs (CATS)" if cats else "")
                       + f", {opts.allocation} allocation")
        if opts.glu == "cats" and len(cats) < sum(b.gated for b in ctx.blocks.ffn):
            ctx.log.append("gated: some GLU FFNs did not match down(act(gate(x)) * up(x)); "
                           "their linears are gated one by one")
        del self._weights
        return [*gm.meta["dyn_gated_sites"], *gm.meta["dyn_cats_sites"]]

    # -- allocation="block": what each block's measurement runs ----------------------------
    def _probe_blocks(self, gm: fx.GraphModule, ctx: PassContext, runtime: GatedRuntime,
                      new: dict[int, tuple[str, fx.Node]]) -> None:
        """For each FFN and attention block whose output projection this form rewrote: the
        region from its sites' inputs to that output as a sub-module, and a tap recording
        its inputs and dense output while calibrating."""
        found = 0
        g = to_nx(gm.graph)
        for block in [*ctx.blocks.ffn, *ctx.blocks.attention]:
            last = getattr(block, "down", None) or getattr(block, "o", None)
            if last is None or id(last) not in new:
                continue
            members = [s for s in _block_linears(block) if id(s) in new]
            output = new[id(last)][1]
            # what the block's ops read: x of each gated_linear, x (not the gate
            # activation, computed from x inside the block) of a cats_glu
            seeds = list(dict.fromkeys(
                op.args[1] if op.target is torch.ops.dyncompile.cats_glu.default
                else op.args[0] for op in (new[id(s)][1] for s in members)))
            region = block_region(g, seeds, output)
            if region is None:
                ctx.log.append(f"gated: block {new[id(last)][0]!r} writes in place; "
                               "uniform allocation there")
                continue
            piece = build_piece(gm, f"block{found}", region, [output])
            key = new[id(last)][0]
            sites = sorted({new[id(s)][0] for s in members})
            probe = runtime.blocks.setdefault(key, BlockProbe(sites, piece.module))
            ctx.taps.append(([*piece.inputs, output], probe.record))
            found += 1
        ctx.log.append(f"gated: block allocation measures {found} blocks")

    # -- one linear -> gated_linear ------------------------------------------------------
    def _rewrite_linear(self, gm: fx.GraphModule, site: LinearSite, state_id: int,
                        runtime: GatedRuntime) -> tuple[str, fx.Node]:
        g = gm.graph
        replace = replaced_node(site)
        name = site.weight_name or site.node.name
        with g.inserting_before(replace):
            wt = self._t(g, site.weight) if site.layout == "out_in" else site.weight
            y = g.call_function(torch.ops.dyncompile.gated_linear.default,
                                (site.x, wt, site.bias, state_id, name))
        copy_meta(replace, y)
        y.meta[LINEAR_FLOPS] = float(2 * site.in_features * site.out_features)
        replace.replace_all_uses_with(y)
        norms = self._input_norms(site)
        runtime.register(name, float(site.in_features * site.out_features),
                         channel_weight=norms)
        if runtime.criterion == "wina" and norms is not None:
            p = self._weights.param(site.weight)
            runtime.scales[name] = norms.sqrt().to(p.device if p is not None else "cpu")
        return name, y

    # -- GLU FFN -> cats_glu ---------------------------------------------------------------
    def _rewrite_cats(self, gm: fx.GraphModule, m: _CatsMatch, state_id: int,
                      runtime: GatedRuntime) -> tuple[str, fx.Node]:
        g = gm.graph
        up, down = m.up, m.down
        replace = replaced_node(down)
        name = down.weight_name or down.node.name
        with g.inserting_before(replace):
            w_up = self._t(g, up.weight) if up.layout == "in_out" else up.weight
            w_down = self._t(g, down.weight) if down.layout == "out_in" else down.weight
            y = g.call_function(torch.ops.dyncompile.cats_glu.default,
                                (m.act, up.x, w_up, up.bias, w_down, down.bias, state_id, name))
        copy_meta(replace, y)
        y.meta[LINEAR_FLOPS] = float(2 * (up.in_features * up.out_features
                                          + down.in_features * down.out_features))
        replace.replace_all_uses_with(y)
        d, hid, out = up.in_features, up.out_features, down.out_features
        cost = float(2 * d * hid + hid * out)
        runtime.register(name, cost, fixed=d * hid / cost,
                         channel_weight=self._input_norms(down))
        return name, y

    def _input_norms(self, site: LinearSite) -> torch.Tensor | None:
        """Squared norm of each input channel's weights (the row the kernel reads)."""
        p = self._weights.param(site.weight)
        if p is None or p.dim() != 2:
            return None
        with torch.no_grad():
            return p.float().square().sum(0 if site.layout == "out_in" else 1)

    def _t(self, g: fx.Graph, weight: fx.Node) -> fx.Node:
        return self._weights.transposed(g, weight, self.name)
