"""CPU kernels: compute only the selected (token, expert) pairs, from contiguous expert slices.

Expert e's weights are row blocks ``w_up[lo:hi]`` / ``w_down_t[lo:hi]``: every
path works on views and skips the experts no token picks. The one copy is made
once per weight, not per call: the block kernel's packed up (and gate) weights
(``_packed16``). Paths (``choose_path`` picks one per call
from the actual mask):

- fused (C++): for a few fp32 tokens, each selected expert's up and down rows
  are read once and applied to all its tokens with vectorised dot products and
  axpys (no BLAS, no hidden buffer), experts split across torch's threads;
- shared: every token picks the same experts (one token, an all-true mask):
  no gather or scatter, one matmul pair per run of neighbouring selected
  experts (a single dense pair when all are selected);
- grouped (C++): for fp32, the block kernel (``expert_ffn_blocks``), one call per
  FFN: a counting sort of the (token, expert) pairs by expert, then per expert
  (adjacent experts with the same tokens merged into one wider slice) the up
  (and gate) projection: with AVX-512 and slices in whole blocks of 16 units,
  register tiles of six token rows by 64 units read the tokens' rows in place
  from the packed weights (``up_from_rows``: no gather) and add the bias (and
  the exact GELU, with no gate) as they store; otherwise a gather of the token
  rows and an sgemm on the weight slice, then the bias (exact GELU with no
  gate: fused with the bias in one pass, ATen's vectorised erf). Other
  activations: torch's vectorised kernels, once per chunk of experts. Then the
  down projection: with AVX-512 and an
  output width that is a multiple of 64, register tiles of six token rows by
  64 columns add it straight into the tokens' output rows (``down_into_rows``);
  otherwise an sgemm into a buffer, added row by row into the output. Threads
  split token tiles when there are enough tokens (each owns its output rows
  and starts them from the down bias), else experts (each adds into its own
  partial output, summed at the end): no index_add, no race, BLAS single
  threaded inside. Other dtypes: the older per-expert at::mm loop with one
  index_add; the same loop in torch if no compiler;
- dense: one dense FFN with the unselected units zeroed, where the selection
  is too dense (or the experts too short) for grouping to pay.

The C++ kernels are built on first use with ``torch.utils.cpp_extension.load_inline``
(cached after); if no compiler is available the torch paths are used. They are
compiled with ``-fopenmp``: without it ``at::parallel_for`` in the extension
runs serially.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cpp_extension import InlineExtension
from .reference import ACTIVATIONS, expert_bounds, hidden_mask

_EXT = InlineExtension("dyncompile_expert_ffn_v18", Path(__file__).with_name("expert_ffn.cpp"),
                       ["expert_ffn_fwd", "expert_ffn_grouped", "expert_ffn_blocks", "mask_stats",
                        "use_blas"],
                       ("-O3", "-march=native", "-fopenmp"))



def kernel_available() -> bool:
    return _EXT.available()


# The block kernel reads the up (and gate) weights from a copy packed [H/16, D, 16]
# (units in blocks of 16, each input-major), made once per weight (and again after an
# in-place change): the up projection then reads the tokens' rows in place, no gather.
# Costs one more copy of those weights in memory.
_ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
# id(base tensor) -> (weak reference to it, {(data_ptr, shape, stride): (version, copy)}).
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}
_EMPTY = torch.empty(0)
packs_made = 0  # how many packed copies were made (tests check it stays at one per weight)


def _packed16(w: torch.Tensor | None) -> torch.Tensor:
    """``w`` [H, D] fp32 packed [H/16, D, 16], cached per weight; empty where not packed."""
    global packs_made
    if w is None or w.dtype != torch.float32 or w.dim() != 2 \
            or w.shape[0] % 16:
        return _EMPTY
    base = w._base if w._base is not None else w
    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
    ent = _PACKED.get(id(base))
    if ent is None or ent[0]() is not base:
        ent = _PACKED[id(base)] = (
            weakref.ref(base, lambda _, k=id(base): _PACKED.pop(k, None)), {})
    per_base = ent[1]
    got = per_base.get(key)
    if got is None or got[0] != w._version:
        if got is None and len(per_base) >= 4:  # the weight's memory moved: forget old copies
            per_base.clear()
        packed = w.detach().reshape(-1, 16, w.shape[1]).transpose(1, 2).contiguous()
        got = per_base[key] = (w._version, packed)
        packs_made += 1
    return got[1]


def _act_(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Activation in place on a fresh temporary (no second [N, H] buffer: a fresh large
    buffer costs a page fault per 4 KiB on every call)."""
    if activation == "relu":
        return h.relu_()
    if activation == "gelu":
        return torch.ops.aten.gelu_(h)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h, inplace=True)
    if activation == "sigmoid":
        return h.sigmoid_()
    if activation == "tanh":
        return h.tanh_()
    return h  # identity (validated by the caller)


def _runs(selected: list[int]) -> list[tuple[int, int]]:
    """Sorted expert ids -> ``[(first, last + 1)]`` runs of consecutive experts."""
    runs: list[tuple[int, int]] = []
    for e in selected:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)  # no copy when the dtype already matches


class _Slices:
    """The FFN weights, sliced per hidden range without copying."""

    def __init__(self, w_up, b_up, w_gate, b_gate, w_down_t, activation, dtype):
        self.w_up, self.b_up = _cast(w_up, dtype), _cast(b_up, dtype)
        self.w_gate, self.b_gate = _cast(w_gate, dtype), _cast(b_gate, dtype)
        self.w_down_t = _cast(w_down_t, dtype)
        self.activation = activation

    def hidden(self, xs: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """act(up) or act(gate) * up for hidden units [lo, hi)."""
        bu = self.b_up[lo:hi] if self.b_up is not None else None
        h = F.linear(xs, self.w_up[lo:hi], bu)
        if self.w_gate is None:
            return _act_(h, self.activation)
        bg = self.b_gate[lo:hi] if self.b_gate is not None else None
        return _act_(F.linear(xs, self.w_gate[lo:hi], bg), self.activation).mul_(h)


def _bias(n: int, n_out: int, b_down: torch.Tensor | None) -> torch.Tensor:
    """[n, n_out] fp32 output holding b_down (or zeros)."""
    y = torch.zeros(n, n_out, dtype=torch.float32)
    return y.add_(b_down.to(torch.float32)) if b_down is not None else y


def _down(y: torch.Tensor | None, h: torch.Tensor, w_rows: torch.Tensor,
          b_down: torch.Tensor | None) -> torch.Tensor:
    """``y + h @ w_rows`` in fp32; for y None ``b_down + h @ w_rows`` (one addmm for fp32)."""
    if h.dtype != torch.float32:
        part = torch.mm(h, w_rows).float()
        if y is not None:
            return y.add_(part)
        return part.add_(b_down.to(torch.float32)) if b_down is not None else part
    if y is not None:
        return y.addmm_(h, w_rows)
    if b_down is not None:
        return torch.addmm(b_down.to(torch.float32), h, w_rows)
    return torch.mm(h, w_rows)


def _zero_unselected(h: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero, in place, the hidden units [N, H] of the experts a token did not select."""
    n, hidden = h.shape
    n_exp = mask.shape[1]
    if hidden % n_exp == 0:  # equal widths: a broadcast over a view, no [N, H] mask
        h.view(n, n_exp, hidden // n_exp).mul_(mask.to(h.dtype).unsqueeze(-1))
    else:
        h.mul_(hidden_mask(mask, hidden, h.dtype))


def _fused_ok(x2, w_up, b_up, w_gate, b_gate, w_down_t, b_down) -> bool:
    ts = [t for t in (x2, w_up, b_up, w_gate, b_gate, w_down_t, b_down) if t is not None]
    return (all(t.dtype == torch.float32 for t in ts)
            and all(t.is_contiguous() for t in ts[1:]))


# Path choice, measured with benchmarks/expert_ffn.py and interleaved sweeps
# (2 and 1 threads, D=384/768, E=16..96). "fused" (C++ dot products, each selected
# weight row read once, no BLAS) wins in the decode regime, while the selected work
# is a few tokens' worth of the dense FFN.
FUSED_MAX_TOKENS = 32
FUSED_MAX_WORK = 8.0
# fp32 "grouped" (the C++ block kernel, sgemm on the slices) costs about 1.25x
# the dense FFN per computed unit at 64-unit experts, more for narrower ones
# (1-thread break-even vs dense: ~0.8 kept at 64 units, ~0.7 at 32, ~0.63 at 16);
# the masked dense fallback costs ~1.1-1.15x dense, so grouped is taken while the
# kept fraction is below BLOCKS_MAX_ACTIVE, scaled by (width / BLOCKS_FULL_WIDTH)
# ** 0.2 below that width.
BLOCKS_MAX_ACTIVE = 0.85
BLOCKS_FULL_WIDTH = 64
# Tokens per tile when the block kernel splits tokens (not experts) across threads.
GROUPED_TILE = 512
# Other dtypes (or no C++ kernel): "grouped" runs one narrow torch GEMM pair per
# selected expert: it pays when the per-expert GEMMs are big enough (mean tokens
# per expert x expert width) and the selection sparse enough; narrower experts run
# slower, so the break-even fraction shrinks as sqrt(width / GROUPED_FULL_WIDTH).
GROUPED_MIN_BLOCK = 2048
GROUPED_MAX_ACTIVE = 0.5
GROUPED_FULL_WIDTH = 192
PATHS = ("fused", "shared", "grouped", "grouped_torch", "dense")


def choose_path(n: int, n_exp: int, hidden: int, pairs: int, shared: bool,
                fused_ok: bool) -> str:
    """The CPU path for ``n`` tokens selecting ``pairs`` of ``n * n_exp`` (token, expert).

    ``fused_ok``: fp32 with contiguous weights and the C++ kernels built (the fused
    and block kernels apply).
    """
    if fused_ok and 0 < n <= FUSED_MAX_TOKENS and pairs <= FUSED_MAX_WORK * n_exp:
        return "fused"
    if shared:
        return "shared"
    width = hidden / n_exp
    if fused_ok:
        max_active = BLOCKS_MAX_ACTIVE * min(1.0, width / BLOCKS_FULL_WIDTH) ** 0.2
        return "grouped" if pairs <= max_active * n * n_exp else "dense"
    max_active = GROUPED_MAX_ACTIVE * min(1.0, width / GROUPED_FULL_WIDTH) ** 0.5
    if pairs / n_exp * width >= GROUPED_MIN_BLOCK and pairs <= max_active * n * n_exp:
        return "grouped"
    return "dense"


def expert_ffn_cpu(x2: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
                   w_gate: torch.Tensor | None, b_gate: torch.Tensor | None,
                   w_down_t: torch.Tensor, b_down: torch.Tensor | None, mask: torch.Tensor,
                   activation: str, path: str | None = None) -> tuple[torch.Tensor, int, int, str]:
    """(y [N, D_out] fp32, selected (token, expert) pairs, computed (token, unit) pairs, path).

    ``x2`` is [N, D] and ``mask`` [N, E] bool; arguments are assumed validated.
    ``path`` (one of PATHS) forces a path, else ``choose_path`` picks one:

    - fused: the C++ row kernel (fp32, contiguous weights; else falls back);
    - shared: every token picks the same experts; runs of neighbouring selected
      experts computed on all tokens at once, no gather (raises if the rows differ);
    - grouped: tokens grouped by expert, GEMMs on the slices, experts split
      across threads (C++; the torch loop "grouped_torch" if no compiler);
    - dense: one dense FFN with the unselected units zeroed (nothing skipped:
      the computed units are N * H).

    Matmuls run in x's dtype (weights of another dtype are cast: a copy), the
    output accumulates in fp32. No weight is copied otherwise.
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"expert_ffn: unknown CPU path {path!r}; expected one of {PATHS}")
    n = x2.shape[0]
    hidden, n_out = w_down_t.shape
    n_exp = mask.shape[1]
    fused_ok = _fused_ok(x2, w_up, b_up, w_gate, b_gate, w_down_t, b_down)
    mod = _EXT.load() if path in (None, "fused", "grouped") else None
    pairs = None
    if path is None and 0 < n <= FUSED_MAX_WORK and fused_ok and mod is not None:
        path = "fused"  # at most n * E <= FUSED_MAX_WORK * E pairs: skip counting them
    if path is None:
        if mod is not None:
            pairs, same_rows = mod.mask_stats(mask)
        else:
            pairs = int(mask.sum())
            same_rows = bool((mask == mask[:1]).all())
        shared = n == 1 or pairs in (0, n * n_exp) or same_rows
        path = choose_path(n, n_exp, hidden, pairs, shared, fused_ok and mod is not None)
    if path == "fused" and not (fused_ok and mod is not None and n > 0):
        path = "grouped"
    if path == "grouped" and mod is None:
        path = "grouped_torch"
    act = _ACT_CODES[activation]
    empty = _EMPTY
    if path == "grouped" and x2.dtype == torch.float32:
        if not fused_ok:  # weights of another dtype are cast (a copy); fp32 pass as they are
            w_up, b_up, w_gate, b_gate, w_down_t = (
                _cast(t, torch.float32) for t in (w_up, b_up, w_gate, b_gate, w_down_t))
        y, pairs, units = mod.expert_ffn_blocks(
            x2, w_up, b_up if b_up is not None else empty,
            w_gate if w_gate is not None else empty, b_gate if b_gate is not None else empty,
            w_down_t, b_down if b_down is not None else empty, mask, act, GROUPED_TILE,
            _packed16(w_up), _packed16(w_gate))
        return y, int(pairs), int(units), path
    if path == "fused":
        y, pairs, units = mod.expert_ffn_fwd(
            x2, w_up, b_up if b_up is not None else empty,
            w_gate if w_gate is not None else empty, b_gate if b_gate is not None else empty,
            w_down_t, b_down if b_down is not None else empty, mask, act)
        return y, int(pairs), int(units), path
    w = _Slices(w_up, b_up, w_gate, b_gate, w_down_t, activation, x2.dtype)
    if path == "grouped":
        y, pairs, units = mod.expert_ffn_grouped(
            x2, w.w_up, w.b_up if w.b_up is not None else empty,
            w.w_gate if w.w_gate is not None else empty,
            w.b_gate if w.b_gate is not None else empty, w.w_down_t,
            b_down if b_down is not None else empty, mask, act)
        return y, int(pairs), int(units), path
    bounds = expert_bounds(hidden, n_exp)
    if pairs is None:
        pairs = int(mask.sum())
    if path == "shared":
        if n > 1 and not bool((mask == mask[:1]).all()):
            raise ValueError("expert_ffn: the shared path needs every token to pick the "
                             "same experts")
        selected = mask[0].nonzero().flatten().tolist() if n else []
        y, units = None, 0
        for first, last in _runs(selected):
            lo, hi = bounds[first][0], bounds[last - 1][1]
            if hi > lo:
                y = _down(y, w.hidden(x2, lo, hi), w.w_down_t[lo:hi], b_down)
                units += hi - lo
        return (_bias(n, n_out, b_down) if y is None else y), pairs, n * units, path
    if path == "dense":
        h = w.hidden(x2, 0, hidden)
        _zero_unselected(h, mask)
        return _down(None, h, w.w_down_t, b_down), pairs, n * hidden, path
    y = _bias(n, n_out, b_down)
    counts = mask.sum(0).tolist()
    tokens = mask.t().nonzero()[:, 1]  # pairs grouped by expert, tokens ascending within one
    xs = x2.index_select(0, tokens)  # one gather; each expert then works on a row block
    ys = torch.empty(pairs, n_out, dtype=x2.dtype)
    off = units = 0
    for e, c in enumerate(counts):
        lo, hi = bounds[e]
        if c and hi > lo:
            torch.mm(w.hidden(xs[off:off + c], lo, hi), w.w_down_t[lo:hi],
                     out=ys[off:off + c])
            units += c * (hi - lo)
        elif c:
            ys[off:off + c] = 0.0  # an expert with no hidden units (H < E)
        off += c
    y.index_add_(0, tokens, ys if ys.dtype == torch.float32 else ys.float())
    return y, pairs, units, path
