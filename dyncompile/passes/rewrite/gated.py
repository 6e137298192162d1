"""Form ``gated``: training-free activation sparsity for the linears of FFN and attention blocks.

Every linear inside a detected FFN or attention block becomes

    thr = dyncompile::gate_threshold(x, state, site)     # budget -> threshold, at run time
    y   = dyncompile::sparse_linear(x, W_t, b, thr)      # skip rows of W_t where |x| < thr

Thresholds come from |x| quantiles gathered on calibration data through the
graph itself (no hooks). The budget maps to a per-linear sparsity of
``1 - budget`` (uniform allocation): the rewritten linears spend about
``budget`` of their dense cost per token. Budget 1.0 gives threshold 0, the
dense linear.

Weights used as ``F.linear`` weights ([out, in]) are switched once, in place,
to input-major memory (same values and shape, transposed strides), so an active
input channel is one contiguous row and no weight is ever copied per call.
"""

from __future__ import annotations

import torch
from torch import fx

from ...ops.gate_threshold import op as _gate_op  # noqa: F401  (registers the op)
from ...ops.gate_threshold.reference import interpolate
from ...ops.sparse_linear import op as _sparse_op  # noqa: F401  (registers the op)
from ...runtime.calibration import MagnitudeSample
from ..base import Pass, PassContext
from ..graph_utils import is_param, op_kind, placeholder_info
from ..linears import LinearSite
from . import register_form

LEVELS = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)


class GatedRuntime:
    """Calibration samples and per-site threshold tables of the gated form."""

    def __init__(self) -> None:
        self.samples: dict[str, MagnitudeSample] = {}
        self.tables: dict[str, torch.Tensor] = {}
        self._cache: dict[float, dict[str, float]] = {}  # budget -> site -> threshold

    @property
    def calibrated(self) -> bool:
        return bool(self.tables) and set(self.samples) <= set(self.tables)

    def observe(self, site: str, x: torch.Tensor) -> None:
        seed = sum(map(ord, site)) % (1 << 31)
        self.samples.setdefault(site, MagnitudeSample(seed=seed)).add(x)

    def finalize(self) -> None:
        for site, sample in self.samples.items():
            q = sample.quantiles(LEVELS).double()
            q[0] = 0.0
            self.tables[site] = torch.cummax(q, 0).values
        self._cache.clear()

    def threshold(self, site: str, budget: float) -> float:
        if budget >= 1.0:
            return 0.0
        per_site = self._cache.get(budget)
        if per_site is None:
            if len(self._cache) > 64:
                self._cache.clear()
            per_site = self._cache[budget] = {}
        value = per_site.get(site)
        if value is None:
            table = self.tables.get(site)
            if table is None:
                raise RuntimeError(f"gated: site {site!r} was not calibrated; run calibration "
                                   "batches through optimize(..., calibration=...) first")
            value = per_site[site] = interpolate(LEVELS, table, 1.0 - budget)
        return value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.tables.items()}


def _placeholder_index(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}


@register_form
class GatedForm(Pass):
    """Rewrite FFN and attention linears into budget-controlled sparse linears."""

    name = "gated"
    version = "1"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        assert ctx.blocks is not None and ctx.state is not None
        ctx.state.form(self.name, GatedRuntime)
        sites: list[LinearSite] = []
        for block in [*ctx.blocks.ffn, *ctx.blocks.attention]:
            for s in [*getattr(block, "up", []), getattr(block, "down", None),
                      getattr(block, "q", None), getattr(block, "k", None),
                      getattr(block, "v", None), getattr(block, "o", None)]:
                if s is not None and s not in sites:
                    sites.append(s)
        index = _placeholder_index(gm)
        opts = dict(ctx.config.form_options.get(self.name, {}))
        for site in sites:
            self._rewrite(gm, site, ctx.state.id)
            if site.layout == "out_in" and opts.get("layout", "input_major") == "input_major":
                self._input_major(site, index, ctx)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        gm.meta["dyn_gated_sites"] = [s.weight_name for s in sites]
        ctx.log.append(f"gated: rewrote {len(sites)} linears")

    @staticmethod
    def _rewrite(gm: fx.GraphModule, site: LinearSite, state_id: int) -> None:
        g = gm.graph
        # x @ W + b: the add carries the bias, which sparse_linear takes over.
        replace = (site.output if op_kind(site.node) == "matmul" and site.output is not site.node
                   else site.node)
        with g.inserting_before(replace):
            wt = (g.call_function(torch.t, (site.weight,)) if site.layout == "out_in"
                  else site.weight)
            thr = g.call_function(torch.ops.dyncompile.gate_threshold.default,
                                  (site.x, state_id, site.weight_name or site.node.name))
            y = g.call_function(torch.ops.dyncompile.sparse_linear.default,
                                (site.x, wt, site.bias, thr))
        y.meta.update({k: v for k, v in replace.meta.items() if k in ("val", "example_value",
                                                                       "nn_module_stack",
                                                                       "stack_trace")})
        replace.replace_all_uses_with(y)

    @staticmethod
    def _input_major(site: LinearSite, index: dict[fx.Node, int], ctx: PassContext) -> None:
        w = site.weight
        if not (w.op == "placeholder" and is_param(w) and w in index):
            return
        if index[w] >= len(ctx.example_inputs):
            return
        p = ctx.example_inputs[index[w]]
        if isinstance(p, torch.nn.Parameter) and p.dim() == 2 and p.stride() != (1, p.shape[0]):
            name = placeholder_info(w)[1]

            def convert(p: torch.nn.Parameter = p) -> None:
                if p.stride() != (1, p.shape[0]):
                    with torch.no_grad():
                        p.data = p.data.t().contiguous().t()

            ctx.after_first_call.append(convert)
            ctx.log.append(f"gated: {name} -> input-major after the first call")
