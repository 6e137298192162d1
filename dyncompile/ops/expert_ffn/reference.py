"""Plain-torch semantics of expert_ffn: the oracle every kernel is tested against.

The FFN's hidden units are permuted so that expert ``e`` of ``E`` owns the
contiguous slice ``[e*H//E, (e+1)*H//E)``. With ``mask`` [N, E] (N = tokens,
leading dims flattened):

    plain: h = act(x @ w_up.T + b_up)
    GLU:   h = act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)
    y = (h * mask expanded to the hidden units) @ w_down_t + b_down

``w_up`` / ``w_gate`` are [H, D] and ``w_down_t`` is [H, D_out] (input-major),
so an expert's weights are contiguous row blocks. The reference computes the
dense FFN in fp32 and zeroes the unselected hidden units; ``b_down`` is always
added, even for a token that selects no expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "identity")


def check_activation(activation: str) -> str:
    """Return ``activation`` if supported, else raise ValueError."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_ffn: unknown activation {activation!r}; "
                         f"expected one of {', '.join(ACTIVATIONS)}")
    return activation


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` (a name from ACTIVATIONS) applied elementwise."""
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    if activation == "sigmoid":
        return torch.sigmoid(h)
    if activation == "tanh":
        return torch.tanh(h)
    if activation == "identity":
        return h
    check_activation(activation)
    raise AssertionError("unreachable")


def expert_bounds(hidden: int, experts: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` per expert: expert e owns hidden units ``[e*H//E, (e+1)*H//E)``."""
    if experts <= 0:
        raise ValueError(f"expert_ffn: need at least one expert, got {experts}")
    return [(e * hidden // experts, (e + 1) * hidden // experts) for e in range(experts)]


def expert_widths(hidden: int, experts: int) -> list[int]:
    """Hidden units per expert (they differ by at most one)."""
    return [hi - lo for lo, hi in expert_bounds(hidden, experts)]


def check_args(x: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor | None,
               w_down_t: torch.Tensor, mask: torch.Tensor, activation: str) -> None:
    """Shape checks shared by every kernel (ValueError with the offending shapes)."""
    check_activation(activation)
    if w_up.dim() != 2 or w_down_t.dim() != 2 or x.dim() < 1:
        raise ValueError("expert_ffn: w_up must be [H, D] and w_down_t [H, D_out]")
    hidden, d = w_up.shape
    if x.shape[-1] != d or w_down_t.shape[0] != hidden:
        raise ValueError(f"expert_ffn: x {tuple(x.shape)}, w_up {tuple(w_up.shape)} and "
                         f"w_down_t {tuple(w_down_t.shape)} do not agree")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"expert_ffn: w_gate {tuple(w_gate.shape)} must match w_up "
                         f"{tuple(w_up.shape)}")
    n = x.numel() // d if d else 0
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(f"expert_ffn: mask must be [N={n}, E], got {tuple(mask.shape)}")


def selected_units(mask: torch.Tensor, hidden: int) -> tuple[int, int]:
    """(selected (token, expert) pairs, selected (token, hidden unit) pairs) of ``mask``."""
    counts = mask.sum(0, dtype=torch.float64)
    widths = torch.tensor(expert_widths(hidden, mask.shape[1]), dtype=torch.float64,
                          device=mask.device)
    return int(counts.sum()), int(counts @ widths)


def unit_experts(hidden: int, experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H] int64: the expert that owns each hidden unit."""
    widths = torch.tensor(expert_widths(hidden, experts), device=device)
    return torch.repeat_interleave(torch.arange(experts, device=device), widths,
                                   output_size=hidden)


def hidden_mask(mask: torch.Tensor, hidden: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[N, E] expert mask -> [N, H] hidden-unit mask (``dtype``: bool or a 0/1 float)."""
    # Through a float: index_select along dim 1 is ~8x slower for bool/uint8 on CPU.
    fdt = dtype if dtype.is_floating_point else torch.float32
    units = mask.to(fdt).index_select(1, unit_experts(hidden, mask.shape[1], mask.device))
    return units if dtype.is_floating_point else units != 0


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def expert_ffn_reference(x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
                         w_gate: torch.Tensor | None, b_gate: torch.Tensor | None,
                         w_down_t: torch.Tensor, b_down: torch.Tensor | None,
                         mask: torch.Tensor, activation: str) -> torch.Tensor:
    """Dense FFN in fp32 with the unselected experts' hidden units zeroed; x's dtype out."""
    check_args(x, w_up, w_gate, w_down_t, mask, activation)
    hidden, d = w_up.shape
    x2 = x.reshape(-1, d).to(torch.float32)
    h = F.linear(x2, _f32(w_up), _f32(b_up))
    if w_gate is not None:
        h = apply_activation(F.linear(x2, _f32(w_gate), _f32(b_gate)), activation) * h
    else:
        h = apply_activation(h, activation)
    h = h.masked_fill(~hidden_mask(mask.to(torch.bool), hidden), 0.0)
    y = h @ w_down_t.to(torch.float32)
    if b_down is not None:
        y = y + b_down.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_down_t.shape[1])
