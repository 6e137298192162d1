"""The expert form's ops: ``dyncompile::expert_ffn`` and ``dyncompile::expert_route``.

Thin glue over the pure kernels in ``dyncompile.ops.expert_ffn`` and
``dyncompile.ops.expert_route``: ``expert_route`` reads the router and tau for
the budget in force from the model's runtime state; ``expert_ffn`` runs the
kernels and reports what the call skipped to the call's stats.

expert_ffn

CPU: for few fp32 tokens the fused C++ kernel (each selected expert's weight
rows read once); when every token picks the same experts, matmuls on the
selected slices for all tokens at once; otherwise tokens grouped by expert,
unless one dense FFN with the unselected units zeroed is faster (see
``cpu.choose_path``: the choice is made per call from the actual mask). CUDA:
the Triton kernels. Both report the FLOPs they skipped to the call's stats.

Both ops are registered with ``torch.library.Library`` rather than ``custom_op``:
a call reaches the kernel from the dispatcher directly, without custom_op's
per-call Python autograd layers (which cost tens of microseconds per call between
a model's kernels).
"""

from __future__ import annotations

import torch

from ...core import stats as _stats
from ...core.budget import get_state
from ...ops.expert_ffn.cpu import expert_ffn_cpu
from ...ops.expert_ffn.reference import check_args, expert_ffn_reference, selected_units

FORM = "expert"

_LIB = torch.library.Library("dyncompile", "FRAGMENT")
_LIB.define("expert_ffn(Tensor x, Tensor w_up, Tensor? b_up, Tensor? w_gate, Tensor? b_gate, "
            "Tensor w_down_t, Tensor? b_down, Tensor mask, str activation) -> Tensor")
# Every other backend: the reference (dense, masked).
_LIB.impl("expert_ffn", expert_ffn_reference, "CompositeExplicitAutograd")


def expert_ffn(x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
               w_gate: torch.Tensor | None, b_gate: torch.Tensor | None,
               w_down_t: torch.Tensor, b_down: torch.Tensor | None, mask: torch.Tensor,
               activation: str) -> torch.Tensor:
    """FFN over the experts each token selects; w_up/w_gate [H, D], w_down_t [H, D_out].

    ``mask`` [N, E] (bool) selects, per flattened token, the experts whose hidden
    slices ``[e*H//E, (e+1)*H//E)`` are kept; see ``reference.py``.
    """
    return torch.ops.dyncompile.expert_ffn.default(x, w_up, b_up, w_gate, b_gate, w_down_t,
                                                   b_down, mask, activation)


@torch.library.register_fake("dyncompile::expert_ffn")
def _(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, mask, activation):
    check_args(x, w_up, w_gate, w_down_t, mask, activation)
    return x.new_empty(*x.shape[:-1], w_down_t.shape[1])


def _flops_per_unit(w_up, w_gate, w_down_t) -> float:
    """FLOPs one (token, hidden unit) pair costs: up (and gate) dot, down axpy."""
    return 2.0 * w_up.shape[1] * (2 if w_gate is not None else 1) + 2.0 * w_down_t.shape[1]


def _cpu(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, mask, activation):
    check_args(x, w_up, w_gate, w_down_t, mask, activation)
    hidden, d = w_up.shape
    n_out = w_down_t.shape[1]
    x2 = x.reshape(-1, d)
    n, n_exp = mask.shape
    y, pairs, units, path = expert_ffn_cpu(x2, w_up, b_up, w_gate, b_gate, w_down_t, b_down,
                                           mask if mask.dtype is torch.bool else mask.bool(),
                                           activation)
    per_unit = _flops_per_unit(w_up, w_gate, w_down_t)
    # What the routing selected (the budget's measure), whichever path ran it: every
    # path but the masked dense one computes exactly the selected units.
    chosen = units if path != "dense" else selected_units(mask, hidden)[1]
    _stats.record_op(per_unit * (n * hidden - units),
                     ("active_experts", pairs, n * n_exp),
                     ("expert_compute", per_unit * chosen, per_unit * n * hidden))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n_out)


def _cuda(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, mask, activation):  # pragma: no cover
    from ...ops.expert_ffn.triton import expert_ffn_triton

    check_args(x, w_up, w_gate, w_down_t, mask, activation)
    n, n_exp = mask.shape
    # Reading the counts back syncs once per call (the kernel syncs for the pair count anyway).
    pairs, units = selected_units(mask, w_up.shape[0])
    per_unit = _flops_per_unit(w_up, w_gate, w_down_t)
    _stats.record_op(per_unit * (n * w_up.shape[0] - units),
                     ("expert_compute", per_unit * units, per_unit * n * w_up.shape[0]),
                     ("active_experts", pairs, n * n_exp))
    return expert_ffn_triton(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, mask, activation)


def _setup_context(ctx, inputs, output):
    *tensors, mask, activation = inputs
    ctx.save_for_backward(*tensors, mask)
    ctx.activation = activation


def _backward(ctx, grad):
    # Through the reference (dense, masked): simple and exact, not a fast path.
    *tensors, mask = ctx.saved_tensors
    live = [i for i, t in enumerate(tensors) if t is not None]

    def f(*args):
        full = list(tensors)
        for i, a in zip(live, args):
            full[i] = a
        return expert_ffn_reference(*full, mask, ctx.activation)

    _, vjp = torch.func.vjp(f, *(tensors[i] for i in live))
    grads: list[torch.Tensor | None] = [None] * (len(tensors) + 2)  # + mask, activation
    for i, g in zip(live, vjp(grad)):
        grads[i] = g
    return tuple(grads)


# The kernels are registered with the dispatcher directly (not through custom_op, whose
# per-call Python layers cost tens of microseconds between a model's kernels); autograd
# through the reference.
_LIB.impl("expert_ffn", _cpu, "CPU")
_LIB.impl("expert_ffn", _cuda, "CUDA")
torch.library.register_autograd("dyncompile::expert_ffn", _backward,
                                setup_context=_setup_context)


# ------------------------------------------------------------------------ expert_route
#
#     calibrating:  record x for the site; every expert runs (the dense FFN)
#     budget 1.0:   every expert runs (the dense FFN, no router call)
#     otherwise:    r = router(x) (predicted output norm per expert);
#                   tau = the site's tau for the budget (from its compute curve);
#                   mask[t, e] = r[t, e] >= tau * max_e r[t, e]
#
# Returns a bool mask [N, E] over the flattened tokens. The router's FLOPs are
# reported as spent work (the budget includes them). Opaque to the compiler: a
# bool mask has nothing to differentiate, so one kernel serves every backend.

_LIB.define("expert_route(Tensor x, int state_id, str site, int experts) -> Tensor")


def expert_route(x: torch.Tensor, state_id: int, site: str, experts: int) -> torch.Tensor:
    """Bool mask [N, E]: expert e runs for token t (dynamic-k under the budget in force)."""
    state = get_state(state_id)
    runtime = state.forms[FORM]
    x2 = x.reshape(-1, x.shape[-1])
    if state.calibrating:
        runtime.observe(site, x2)
        return torch.ones(x2.shape[0], experts, dtype=torch.bool, device=x.device)
    knob = state.knob(FORM)
    if knob >= 1.0:
        return torch.ones(x2.shape[0], experts, dtype=torch.bool, device=x.device)
    return runtime.route(site, x2, knob)


_LIB.impl("expert_route", expert_route, "CompositeExplicitAutograd")


@torch.library.register_fake("dyncompile::expert_route")
def _(x, state_id, site, experts):
    return x.new_empty((x.numel() // x.shape[-1], experts), dtype=torch.bool)
