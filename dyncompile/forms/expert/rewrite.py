"""Form ``expert``: every detected FFN becomes a dynamic-k mixture of experts.

Each FFN (plain ``down(act(up(x)))`` or GLU ``down(act(gate(x)) * up(x))``)
is rewritten into

    mask = dyncompile::expert_route(x, state, site, E)      # [N, E] bool, from the budget
    y    = dyncompile::expert_ffn(x, W_up, b_up, W_gate, b_gate, W_down_t, b_down, mask, act)

Calibration batches run the dense FFN and record its inputs. Finalizing then,
per FFN: the hidden units are clustered into E experts of equal width by
co-activation (balanced k-means on |h| patterns) and the weights are permuted
in place, once, so each expert is a contiguous slice (the FFN computes the
same function: the up rows, biases and down columns move together); a small
router is trained to predict each expert's output norm; and the FFN's spent
fraction against tau is measured, router included. A budget ``b`` picks per
FFN the tau whose fraction is ``b``; budget 1.0 runs every expert without the
router, the dense output.

The activation is identified by running the graph's own pointwise region on
a probe and comparing with the ops' known activations, so expanded forms
(``0.5 * x * (1 + tanh(...))``) are found too; an FFN whose activation is not
one of them stays dense (logged).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from ...core import stats as _stats
from ...core.options import checked, choice, positive_int
from ...core.registry import register_form
from ...ops.expert_ffn.reference import ACTIVATIONS, apply_activation, expert_widths
from ...ops.expert_route.cpu import native_bf16, route_lane, route_mask, router_scores
from ...passes.base import Pass, PassContext
from ...passes.blocks import FFNBlock
from ...passes.graph_utils import eliminate_dead_code, op_kind, shape_of
from ...passes.linears import LinearSite
from ...passes.splice import LINEAR_FLOPS, copy_meta, glu_product, replaced_node
from ...passes.weights import Weights
from . import ops as _ops  # noqa: F401  (registers expert_route and expert_ffn)
from .fit import (
    TAUS,
    Router,
    balanced_kmeans,
    compute_curve,
    select,
    train_router,
)

log = logging.getLogger("dyncompile")


@dataclass(frozen=True)
class ExpertOptions:
    """``form_options={"expert": {...}}``; None means the default named below.

    experts: experts per FFN (default: hidden // expert_size).
    expert_size: hidden units per expert when ``experts`` is not given (64).
    router_hidden: router MLP width (min(128, model width / 2)).
    router_steps: router training steps (400).
    max_tokens: calibration tokens kept per FFN (8192).
    layout: "input_major" (down weights switched once, in place) or "as_is".
    router_precision: the router's first matmul: "bf16" operands (fp32 accumulation,
        bias and the rest fp32), "fp32", or "auto": bf16 on a CPU with native bf16 dot
        products.
    """

    experts: int | None = checked(None, positive_int)
    expert_size: int | None = checked(None, positive_int)
    router_hidden: int | None = checked(None, positive_int)
    router_steps: int | None = checked(None, positive_int)
    max_tokens: int | None = checked(None, positive_int)
    layout: str = choice("input_major", "as_is")
    router_precision: str = choice("auto", "bf16", "fp32")


_POINTWISE = {"activation", "arith", "cast", "dropout", "view"}
REFINE_BUDGETS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)


@dataclass
class ExpertSite:
    """One FFN turned into experts: its weights (with the hidden axis of each) and fit."""

    name: str
    experts: int
    hidden: int
    activation: str
    glu: bool
    params: dict[str, tuple[str, int]]          # role -> (parameter name, hidden axis)
    tensors: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)
    router: Router | None = None
    curve: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    router_error: float = float("nan")
    offsets: torch.Tensor | None = None   # [G, 2]: (budget, tau correction) under sparsity

    @property
    def widths(self) -> list[int]:
        return expert_widths(self.hidden, self.experts)

    def canonical(self, role: str) -> torch.Tensor | None:
        """The weight in the op's orientation: up/gate [H, D], down [H, D_out], biases [H]."""
        p = self.tensors.get(role)
        if p is None:
            return None
        return p.detach() if self.params[role][1] == 0 else p.detach().t()

    def unit_flops(self) -> float:
        d = self.tensors["w_up"].numel() // self.hidden
        d_out = self.tensors["w_down"].numel() // self.hidden
        return 2.0 * d * (2 if self.glu else 1) + 2.0 * d_out


class ExpertRuntime:
    """Calibration inputs, routers, permutations and tau curves of the expert form."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.sites: dict[str, ExpertSite] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self._tau: dict[float, dict[str, float]] = {}
        self._recording: dict[str, list[torch.Tensor]] | None = None
        # site -> (route_lane for fp32 CPU inputs, router FLOPs per token); cleared
        # whenever a router changes.
        self._lanes: dict[str, tuple[Any, float]] = {}

    @property
    def calibrated(self) -> bool:
        return all(s.router is not None for s in self.sites.values())

    def register(self, site: ExpertSite) -> None:
        old = self.sites.get(site.name)
        if old is not None and old.router is not None:   # restored or fitted already
            old.tensors = site.tensors
            return
        self.sites[site.name] = site

    def observe(self, site: str, x: torch.Tensor) -> None:
        # A copy: under Inductor the op's input buffer is reused after the call.
        self.samples.setdefault(site, []).append(x.detach().to("cpu", torch.float32, copy=True))

    # -- fitting ------------------------------------------------------------------------
    def finalize(self) -> None:
        from tqdm.auto import tqdm

        todo = [s for s in self.sites.values() if s.router is None and s.name in self.samples]
        bar = tqdm(todo, desc="dyncompile: fitting experts", unit="ffn", leave=False,
                   disable=len(todo) < 2)
        for site in bar:
            self._fit(site, torch.cat(self.samples.pop(site.name)))
        self._tau.clear()
        self._lanes.clear()

    def _hidden(self, site: ExpertSite, x: torch.Tensor) -> torch.Tensor:
        up = x @ site.canonical("w_up").float().t()
        if site.tensors.get("b_up") is not None:
            up = up + site.canonical("b_up").float()
        if not site.glu:
            return apply_activation(up, site.activation)
        g = x @ site.canonical("w_gate").float().t()
        if site.tensors.get("b_gate") is not None:
            g = g + site.canonical("b_gate").float()
        return apply_activation(g, site.activation) * up

    def _fit(self, site: ExpertSite, x: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(0)
        cap = int(self.options.get("max_tokens") or 8192)
        if x.shape[0] > cap:
            x = x[torch.randperm(x.shape[0], generator=gen)[:cap]]
        with torch.no_grad():
            h = self._hidden(site, x)
            sub = h[torch.randperm(h.shape[0], generator=gen)[:2048]]
            perm = balanced_kmeans(sub.abs().t(), site.widths)
            self._permute(site, perm)
            h = h[:, perm]
            w_down = site.canonical("w_down").float()
            target = torch.stack([(h[:, lo:hi] @ w_down[lo:hi]).norm(dim=1)
                                  for lo, hi in _bounds(site.widths)], dim=1)
        # Held-out tokens (a quarter) for the curve and the router's error: on its own
        # training tokens the router is sharper than on new ones, and tau would be too low.
        order = torch.randperm(x.shape[0], generator=gen)
        n_hold = max(1, x.shape[0] // 4) if x.shape[0] > 1 else 0
        hold, train = order[:n_hold], order[n_hold:] if n_hold < x.shape[0] else order
        width = int(self.options.get("router_hidden") or min(128, max(8, x.shape[1] // 2)))
        router, _ = train_router(x[train], target[train], width,
                                 int(self.options.get("router_steps") or 400))
        with torch.no_grad():  # the scores as the CPU runtime computes them
            scores = router_scores(router.fc1, router.fc2, x[hold], self._bf16_router(x))
            t = target[hold]
            err = float((scores - t).square().mean() / t.square().mean().clamp_min(1e-12))
        site.router, site.router_error, site.perm = router, err, perm
        site.curve = compute_curve(scores, site.widths, router.flops(), site.unit_flops())

    @staticmethod
    def _permute(site: ExpertSite, perm: torch.Tensor) -> None:
        """Reorder the hidden units of every weight of the FFN, in place (strides kept)."""
        with torch.no_grad():
            for role, p in site.tensors.items():
                if p is None:
                    continue
                axis = site.params[role][1]
                p.data.copy_(p.data.index_select(axis, perm.to(p.device)))

    def refine(self, run_at: Any) -> None:
        """Correct each FFN's tau for the inputs it sees once earlier FFNs are sparse.

        The first curve is measured on dense-model inputs; under a budget, the
        FFNs upstream change each FFN's inputs and its router picks more
        experts. For each budget in REFINE_BUDGETS the calibration data runs
        with that budget in force, the routers' scores are recorded, and the
        tau that spends the budget on those scores gives a correction, kept
        as an offset to the first curve's tau (linear between budgets).
        """
        from tqdm.auto import tqdm

        todo = [s for s in self.sites.values() if s.router is not None and s.offsets is None]
        if not todo:
            return
        points: dict[str, list[tuple[float, float]]] = {s.name: [] for s in todo}
        for b in tqdm(REFINE_BUDGETS, desc="dyncompile: fitting tau under sparsity",
                      leave=False, unit="budget"):
            self._recording = {}
            try:
                run_at(b)
                seen = self._recording
            finally:
                self._recording = None
            for s in todo:
                if seen.get(s.name):
                    curve = compute_curve(torch.cat(seen[s.name]), s.widths, s.router.flops(),
                                          s.unit_flops())
                    points[s.name].append((b, _tau_for(curve, b) - _tau_for(s.curve, b)))
        for s in todo:
            s.offsets = torch.tensor(sorted(points[s.name]) or [(1.0, 0.0)],
                                     dtype=torch.float64)
        self._tau.clear()
        self._lanes.clear()

    # -- run time -----------------------------------------------------------------------
    def tau(self, site: str, budget: float) -> float:
        """The tau at which the site's calibrated spent fraction equals ``budget``."""
        per = self._tau.get(budget)
        if per is None:
            if len(self._tau) > 64:
                self._tau.clear()
            per = self._tau[budget] = {}
        value = per.get(site)
        if value is None:
            curve = self.sites[site].curve
            if curve is None:
                raise RuntimeError(f"expert: FFN {site!r} was not calibrated")
            value = _tau_for(curve, budget) + _offset(self.sites[site].offsets, budget)
            value = per[site] = min(max(value, 0.0), 1.0)
        return value

    def _bf16_router(self, x: torch.Tensor) -> bool:
        """Whether the router's first matmul takes bf16 operands for these inputs (fp32
        inputs on CPU only; the ``router_precision`` option)."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        want = self.options.get("router_precision") or "auto"
        return want == "bf16" or (want == "auto" and native_bf16())

    def route(self, site: str, x: torch.Tensor, budget: float) -> torch.Tensor:
        lane = self._lanes.get(site)
        if lane is not None and x.is_cpu and x.dtype is torch.float32 \
                and self._recording is None:
            # The common call, with as little Python as possible (it runs between kernels).
            _stats.record_spent("expert_compute", lane[1] * x.shape[0])
            return lane[0](x, self.tau(site, budget))
        s = self.sites[site]
        if s.router is None:
            raise RuntimeError(f"expert: FFN {site!r} was not calibrated; pass calibration "
                               "batches to optimize(..., calibration=...)")
        router = s.router if s.router.fc1.weight.device == x.device else s.router.to(x.device)
        s.router = router
        n = x.shape[0]
        _stats.record_saving(-router.flops() * n)
        _stats.record_ratio("expert_compute", router.flops() * n, 0.0)
        tau = self.tau(site, budget)
        with torch.no_grad():
            x = x.to(router.fc1.weight.dtype)
            bf16 = self._bf16_router(x)
            if self._recording is None:
                fast = route_lane(router.fc1, router.fc2, bf16) \
                    if x.is_cpu and x.dtype is torch.float32 else None
                if fast is not None:  # the C++ router pass: later calls take it directly
                    self._lanes[site] = (fast, router.flops())
                    return fast(x, tau)
                mask = route_mask(router.fc1, router.fc2, x, tau, bf16)  # CPU fp32 fast path
                if mask is not None:
                    return mask
            scores = router_scores(router.fc1, router.fc2, x, bf16)
        if self._recording is not None:
            self._recording.setdefault(site, []).append(scores.detach().float().cpu().clone())
        return select(scores, tau)

    # -- persistence --------------------------------------------------------------------
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"options": self.options, "sites": {}}
        for name, s in self.sites.items():
            if s.router is None:
                continue
            for k, v in s.router.state_dict().items():
                tensors[f"{name}/router.{k}"] = v
            tensors[f"{name}/curve"] = s.curve
            tensors[f"{name}/perm"] = s.perm
            if s.offsets is not None:
                tensors[f"{name}/offsets"] = s.offsets
            meta["sites"][name] = {"experts": s.experts, "hidden": s.hidden,
                                   "activation": s.activation, "glu": s.glu,
                                   "params": s.params, "router_error": s.router_error,
                                   "router_hidden": s.router.fc1.out_features}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                model: torch.nn.Module) -> None:
        """Load fitted sites and permute ``model``'s FFN weights as they were when saved."""
        self.options = dict(meta.get("options", {}))
        for name, m in meta["sites"].items():
            params = {k: (v[0], int(v[1])) for k, v in m["params"].items()}
            site = ExpertSite(name, m["experts"], m["hidden"], m["activation"], m["glu"],
                              params, router_error=m["router_error"])
            site.tensors = {role: model.get_parameter(fqn) for role, (fqn, _) in params.items()}
            d = tensors[f"{name}/router.fc1.weight"].shape[1]
            router = Router(d, site.experts, m["router_hidden"])
            router.load_state_dict({k.split("/router.", 1)[1]: v for k, v in tensors.items()
                                    if k.startswith(f"{name}/router.")})
            site.router = router.eval().requires_grad_(False)
            site.curve, site.perm = tensors[f"{name}/curve"], tensors[f"{name}/perm"]
            site.offsets = tensors.get(f"{name}/offsets")
            self._permute(site, site.perm)
            self.sites[name] = site
        self._tau.clear()
        self._lanes.clear()


def _bounds(widths: list[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for w in widths:
        out.append((lo, lo + w))
        lo += w
    return out


def _offset(offsets: torch.Tensor | None, budget: float) -> float:
    """The tau correction at ``budget``: linear between fitted budgets, 0 at budget 1."""
    if offsets is None or not len(offsets):
        return 0.0
    pts = [(float(b), float(o)) for b, o in offsets]
    if pts[-1][0] < 1.0:
        pts.append((1.0, 0.0))
    if budget <= pts[0][0]:
        return pts[0][1]
    for (b0, o0), (b1, o1) in zip(pts, pts[1:], strict=False):
        if budget <= b1:
            w = (budget - b0) / (b1 - b0) if b1 > b0 else 1.0
            return o0 + w * (o1 - o0)
    return 0.0


def _tau_for(curve: torch.Tensor, budget: float) -> float:
    """Smallest tau whose fraction is at most ``budget`` (linear between grid points)."""
    f = curve.tolist()
    taus = TAUS.tolist()
    if budget >= f[0]:
        return 0.0
    for i in range(1, len(f)):
        if f[i] <= budget:
            span = f[i - 1] - f[i]
            w = (f[i - 1] - budget) / span if span > 0 else 1.0
            return taus[i - 1] + w * (taus[i] - taus[i - 1])
    return 1.0


# -- graph matching --------------------------------------------------------------------------

def identify_activation(start: fx.Node, end: fx.Node) -> str | None:
    """Name of the pointwise function the graph computes from ``start`` to ``end``, if known.

    Runs the nodes in between on a probe (views, casts and dropout pass values
    through) and compares with each known activation.
    """
    chain: list[fx.Node] = []
    stack, seen = [end], set()
    while stack:
        n = stack.pop()
        if n is start or n in seen:
            continue
        seen.add(n)
        if op_kind(n) not in _POINTWISE or n.op not in ("call_function", "call_method"):
            return None
        chain.append(n)
        stack.extend(i for i in n.all_input_nodes if shape_of(i) is not None)
    probe = torch.linspace(-8.0, 8.0, 2001)
    env: dict[fx.Node, Any] = {start: probe}
    try:
        members = set(chain)
        for n in [n for n in end.graph.nodes if n in members]:
            if op_kind(n) in ("view", "cast", "dropout"):
                src = next(i for i in n.all_input_nodes if i in env)
                env[n] = env[src]
                continue
            missing = [i for i in n.all_input_nodes if i not in env]
            if missing:
                return None
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
        out = env[end]
    except Exception:  # noqa: BLE001  (anything unexpected: not a known activation)
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    for name in ACTIVATIONS:
        if torch.allclose(out, apply_activation(probe, name), atol=2e-5, rtol=1e-4):
            return name
    return None


@dataclass
class _Match:
    up: LinearSite
    gate: LinearSite | None
    down: LinearSite
    activation: str


def _match(block: FFNBlock) -> _Match | str:
    """The FFN's parts, or why it cannot become experts."""
    down = block.down
    if down is None:
        return "no down projection"
    if block.fused_gate_up:
        return "fused gate/up projection"
    if len(block.up) == 1:
        up = block.up[0]
        act = identify_activation(up.output, down.x)
        return _Match(up, None, down, act) if act else "unknown activation"
    parts = glu_product(block)
    if parts is None:
        return "GLU not of the form down(act(gate(x)) * up(x))"
    up, a = parts
    gate = block.gate
    act = identify_activation(gate.output, a)
    if act is None:
        return "unknown activation"
    if shape_of(gate.x) != shape_of(up.x):
        return "gate and up read differently shaped inputs"
    return _Match(up, gate, down, act)


@register_form
class ExpertForm(Pass):
    """Rewrite each FFN into a router plus a dynamic-k mixture of contiguous experts."""

    name = "expert"
    stage = 10
    Options = ExpertOptions
    looks_for = "FFN blocks (up projection(s), activation, down projection)"
    mutates_weights = True
    runtime = ExpertRuntime

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        assert ctx.blocks is not None and ctx.state is not None
        opts = {k: v for k, v in asdict(ctx.config.options_for(self.name)).items()
                if v is not None}
        runtime = ctx.state.form(self.name, lambda: ExpertRuntime(opts))
        weights = Weights(gm, ctx, convert=opts.get("layout", "input_major") == "input_major")
        done: list[str] = []
        for block in ctx.blocks.ffn:
            m = _match(block)
            if isinstance(m, str):
                ctx.log.append(f"expert: FFN {block.name or block.output.name} left dense ({m})")
                continue
            if any(ctx.owner(n) for n in block.nodes):
                continue
            if self._rewrite(gm, m, ctx, weights, runtime, opts):
                done.append(block.name or block.output.name)
                ctx.claim(self.name, [*block.nodes, *(s.node for s in block.up),
                                      block.down.node if block.down else None])
        eliminate_dead_code(gm.graph)
        gm.recompile()
        gm.meta["dyn_expert_sites"] = [s for s in runtime.sites]
        ctx.log.append(f"expert: rewrote {len(done)} of {len(ctx.blocks.ffn)} FFNs")
        return done

    def _rewrite(self, gm: fx.GraphModule, m: _Match, ctx: PassContext, weights: Weights,
                 runtime: ExpertRuntime, opts: dict[str, Any]) -> bool:
        roles = {"w_up": (m.up.weight, m.up.layout == "out_in"),
                 "b_up": (m.up.bias, True),
                 "w_down": (m.down.weight, m.down.layout == "in_out")}
        if m.gate is not None:
            roles["w_gate"] = (m.gate.weight, m.gate.layout == "out_in")
            roles["b_gate"] = (m.gate.bias, True)
        tensors, params = {}, {}
        for role, (node, hidden_first) in roles.items():
            if node is None:
                continue
            p = weights.param(node)
            if p is None:
                ctx.log.append(f"expert: FFN {m.down.weight_name} left dense ({role} is not "
                               "a parameter of the model)")
                return False
            tensors[role] = p
            params[role] = (weights.name(node), 0 if hidden_first else 1)
        hidden = m.down.in_features
        experts = opts.get("experts") or max(2, hidden // int(opts.get("expert_size") or 64))
        experts = min(experts, hidden)
        name = m.down.weight_name
        runtime.register(ExpertSite(name, experts, hidden, m.activation, m.gate is not None,
                                    params, tensors))
        g = gm.graph
        replace = replaced_node(m.down)

        def oriented(site: LinearSite, want_out_in: bool) -> fx.Node:
            is_out_in = site.layout == "out_in"
            if is_out_in == want_out_in:
                return site.weight
            return weights.transposed(g, site.weight, self.name)

        with g.inserting_before(replace):
            mask = g.call_function(torch.ops.dyncompile.expert_route.default,
                                   (m.up.x, ctx.state.id, name, experts))
            w_up = oriented(m.up, True)
            w_gate = oriented(m.gate, True) if m.gate is not None else None
            w_down_t = oriented(m.down, False)
            y = g.call_function(torch.ops.dyncompile.expert_ffn.default,
                                (m.up.x, w_up, m.up.bias, w_gate,
                                 m.gate.bias if m.gate is not None else None, w_down_t,
                                 m.down.bias, mask, m.activation))
        copy_meta(replace, y)
        y.meta[LINEAR_FLOPS] = float(sum(2 * s.in_features * s.out_features for s in
                                         [m.up, m.down, *([m.gate] if m.gate else [])]))
        replace.replace_all_uses_with(y)
        return True
