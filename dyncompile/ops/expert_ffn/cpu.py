"""CPU kernels: compute only the selected (token, expert) pairs, from contiguous expert slices.

Expert e's weights are row blocks ``w_up[lo:hi]`` / ``w_down_t[lo:hi]``: every
path works on views, never copies a weight, and skips the experts no token
picks. Paths (``choose_path`` picks one per call from the actual mask):

- fused (C++): for a few fp32 tokens, each selected expert's up and down rows
  are read once and applied to all its tokens with vectorised dot products and
  axpys (no BLAS, no hidden buffer), experts split across torch's threads;
- shared: every token picks the same experts (one token, an all-true mask):
  no gather or scatter, one matmul pair per run of neighbouring selected
  experts (a single dense pair when all are selected);
- grouped (C++, any dtype): tokens grouped by expert; one gather, then per
  expert the up (and gate) GEMM on its rows, the activation and the down GEMM,
  experts split across threads (narrow GEMMs parallelise badly inside BLAS),
  one index_add into the fp32 output; the same loop in torch if no compiler;
- dense: one dense FFN with the unselected units zeroed, where the selection
  is too dense (or the experts too short) for grouping to pay.

The C++ kernels are built on first use with ``torch.utils.cpp_extension.load_inline``
(cached after); if no compiler is available the torch paths are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpp_extension import InlineExtension
from .reference import ACTIVATIONS, expert_bounds, hidden_mask

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

// Activation codes follow reference.ACTIVATIONS.
static inline float act(float v, int64_t kind) {
  switch (kind) {
    case 0: return v > 0.0f ? v : 0.0f;
    case 1: return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
    case 2: return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 3: return v / (1.0f + std::exp(-v));
    case 4: return 1.0f / (1.0f + std::exp(-v));
    case 5: return std::tanh(v);
    default: return v;
  }
}

// s[q] = w[q] . x for four weight rows (x loaded once, four independent sums).
static inline void dot4(const float* const* w, const float* x, int64_t n, float* s) {
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  #pragma omp simd reduction(+:s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    s0 += w0[i] * xi; s1 += w1[i] * xi; s2 += w2[i] * xi; s3 += w3[i] * xi;
  }
  s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3;
}

// y[n, out] = b_down + sum over selected (token, expert) of h(token, slice) @ w_down_t[slice].
// Each hidden unit's up row and down row are read once for all the tokens that
// selected its expert (fused: no hidden buffer). Returns (y, pairs, units).
std::tuple<torch::Tensor, int64_t, int64_t> expert_ffn_fwd(
    torch::Tensor x, torch::Tensor w_up, torch::Tensor b_up, torch::Tensor w_gate,
    torch::Tensor b_gate, torch::Tensor w_down_t, torch::Tensor b_down, torch::Tensor mask,
    int64_t kind) {
  TORCH_CHECK(x.dim() == 2 && w_up.is_contiguous() && w_down_t.is_contiguous());
  // data_ptr<float>() below also checks every dtype; these are no-ops when contiguous.
  x = x.contiguous();
  b_up = b_up.contiguous(); b_gate = b_gate.contiguous(); b_down = b_down.contiguous();
  mask = mask.to(at::kBool).contiguous();
  const int64_t n = x.size(0), d = x.size(1), hidden = w_up.size(0), out = w_down_t.size(1);
  const int64_t n_exp = mask.size(1);
  const bool glu = w_gate.numel() > 0;
  TORCH_CHECK(!glu || w_gate.is_contiguous());
  const float* xp = x.data_ptr<float>();
  const float* up = w_up.data_ptr<float>();
  const float* gp = glu ? w_gate.data_ptr<float>() : nullptr;
  const float* dp = w_down_t.data_ptr<float>();
  const float* bup = b_up.numel() ? b_up.data_ptr<float>() : nullptr;
  const float* bgp = b_gate.numel() ? b_gate.data_ptr<float>() : nullptr;
  const bool* mp = mask.data_ptr<bool>();
  // Token lists per selected expert (CSR), skipping experts nobody picks.
  std::vector<int64_t> experts, start{0}, toks;
  int64_t units = 0;
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t lo = e * hidden / n_exp, hi = (e + 1) * hidden / n_exp;
    const size_t before = toks.size();
    for (int64_t t = 0; t < n; ++t) if (mp[t * n_exp + e]) toks.push_back(t);
    const int64_t c = static_cast<int64_t>(toks.size() - before);
    units += c * (hi - lo);
    if (c && hi > lo) { experts.push_back(e); start.push_back(static_cast<int64_t>(toks.size())); }
    else toks.resize(before);
  }
  int64_t pairs = 0;
  for (int64_t i = 0; i < n * n_exp; ++i) pairs += mp[i];
  const int64_t k = static_cast<int64_t>(experts.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k));
  std::vector<float> acc(static_cast<size_t>(threads) * n * out, 0.0f);
  // Torch's own thread pool; each chunk of experts accumulates into a private buffer.
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      float* a = acc.data() + static_cast<size_t>(tid) * n * out;
      for (int64_t i = k * tid / threads; i < k * (tid + 1) / threads; ++i) {
        const int64_t e = experts[i];
        const int64_t lo = e * hidden / n_exp, hi = (e + 1) * hidden / n_exp;
        const int64_t* tk = toks.data() + start[i];
        const int64_t c = start[i + 1] - start[i];
        // Four hidden units at a time (the last block padded with a zero-weighted
        // repeat): independent accumulators, one pass over x and the output row.
        for (int64_t j = lo; j < hi; j += 4) {
          const int64_t r = std::min<int64_t>(4, hi - j);
          const float* wu[4];
          const float* wg[4];
          const float* wd[4];
          float bu[4], bg[4];
          for (int64_t q = 0; q < 4; ++q) {
            const int64_t jj = j + std::min(q, r - 1);
            wu[q] = up + jj * d;
            wg[q] = glu ? gp + jj * d : nullptr;
            wd[q] = dp + jj * out;
            bu[q] = bup ? bup[jj] : 0.0f;
            bg[q] = bgp ? bgp[jj] : 0.0f;
          }
          for (int64_t s = 0; s < c; ++s) {
            const int64_t t = tk[s];
            const float* xt = xp + t * d;
            float u[4], v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            dot4(wu, xt, d, u);
            if (glu) {
              float g[4];
              dot4(wg, xt, d, g);
              for (int64_t q = 0; q < r; ++q) v[q] = act(g[q] + bg[q], kind) * (u[q] + bu[q]);
            } else {
              for (int64_t q = 0; q < r; ++q) v[q] = act(u[q] + bu[q], kind);
            }
            if (v[0] == 0.0f && v[1] == 0.0f && v[2] == 0.0f && v[3] == 0.0f) continue;
            float* at_row = a + t * out;
            const float *d0 = wd[0], *d1 = wd[1], *d2 = wd[2], *d3 = wd[3];
            #pragma omp simd
            for (int64_t o = 0; o < out; ++o)
              at_row[o] += v[0] * d0[o] + v[1] * d1[o] + v[2] * d2[o] + v[3] * d3[o];
          }
        }
      }
    }
  });
  auto y = torch::empty({n, out}, x.options());
  float* yp = y.data_ptr<float>();
  const float* bdp = b_down.numel() ? b_down.data_ptr<float>() : nullptr;
  const int64_t total = n * out;
  at::parallel_for(0, total, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t i = e0; i < e1; ++i) {
      float s = bdp ? bdp[i % out] : 0.0f;
      for (int64_t th = 0; th < threads; ++th) s += acc[static_cast<size_t>(th) * total + i];
      yp[i] = s;
    }
  });
  return std::make_tuple(y, pairs, units);
}

static torch::Tensor act_(torch::Tensor h, int64_t kind) {
  switch (kind) {
    case 0: return h.relu_();
    case 1: return at::gelu(h);
    case 2: return at::gelu(h, "tanh");
    case 3: return at::silu_(h);
    case 4: return h.sigmoid_();
    case 5: return h.tanh_();
    default: return h;
  }
}

// Tokens grouped by expert, any dtype: one gather, then each expert's row block
// through BLAS on the weight slices (views), experts split across torch's
// threads (each GEMM single-threaded: narrow GEMMs parallelise badly), one
// index_add into the fp32 output. Returns (y, pairs, units).
std::tuple<torch::Tensor, int64_t, int64_t> expert_ffn_grouped(
    torch::Tensor x, torch::Tensor w_up, torch::Tensor b_up, torch::Tensor w_gate,
    torch::Tensor b_gate, torch::Tensor w_down_t, torch::Tensor b_down, torch::Tensor mask,
    int64_t kind) {
  // Plain tensors: no autograd recording on the worker threads.
  x = x.detach(); w_up = w_up.detach(); b_up = b_up.detach(); w_gate = w_gate.detach();
  b_gate = b_gate.detach(); w_down_t = w_down_t.detach();
  mask = mask.to(at::kBool).contiguous();
  const int64_t n = x.size(0), hidden = w_up.size(0), out = w_down_t.size(1);
  const int64_t n_exp = mask.size(1);
  const bool glu = w_gate.numel() > 0;
  const bool* mp = mask.data_ptr<bool>();
  std::vector<int64_t> toks, start{0}, work;
  toks.reserve(n * n_exp);
  int64_t units = 0;
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t w = (e + 1) * hidden / n_exp - e * hidden / n_exp;
    for (int64_t t = 0; t < n; ++t) if (mp[t * n_exp + e]) toks.push_back(t);
    start.push_back(static_cast<int64_t>(toks.size()));
    units += (start[e + 1] - start[e]) * w;
    work.push_back(units);
  }
  const int64_t pairs = static_cast<int64_t>(toks.size());
  auto y = torch::zeros({n, out}, x.options().dtype(at::kFloat));
  if (b_down.numel()) y.add_(b_down.to(at::kFloat));
  if (!pairs) return std::make_tuple(y, pairs, units);
  auto tokens = torch::from_blob(toks.data(), {pairs}, at::kLong).clone();
  auto xs = x.index_select(0, tokens);
  auto ys = torch::zeros({pairs, out}, x.options());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_exp));
  // Each expert goes to the thread whose equal share of the work holds its midpoint.
  std::vector<int64_t> owner(n_exp, 0);
  for (int64_t e = 0; e < n_exp && units; ++e) {
    const double mid = work[e] - 0.5 * (work[e] - (e ? work[e - 1] : 0));
    owner[e] = std::min<int64_t>(threads - 1, static_cast<int64_t>(mid * threads / units));
  }
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      for (int64_t e = 0; e < n_exp; ++e) {
        if (owner[e] != tid) continue;
        const int64_t lo = e * hidden / n_exp, w = (e + 1) * hidden / n_exp - lo;
        const int64_t c = start[e + 1] - start[e];
        if (!c || !w) continue;
        auto xe = xs.narrow(0, start[e], c);
        auto h = b_up.numel() ? at::addmm(b_up.narrow(0, lo, w), xe, w_up.narrow(0, lo, w).t())
                              : at::mm(xe, w_up.narrow(0, lo, w).t());
        if (glu) {
          auto g = b_gate.numel()
              ? at::addmm(b_gate.narrow(0, lo, w), xe, w_gate.narrow(0, lo, w).t())
              : at::mm(xe, w_gate.narrow(0, lo, w).t());
          h = act_(g, kind).mul_(h);
        } else {
          h = act_(h, kind);
        }
        auto ye = ys.narrow(0, start[e], c);
        at::mm_out(ye, h, w_down_t.narrow(0, lo, w));
      }
    }
  });
  y.index_add_(0, tokens, ys.scalar_type() == at::kFloat ? ys : ys.to(at::kFloat));
  return std::make_tuple(y, pairs, units);
}
"""

_EXT = InlineExtension("dyncompile_expert_ffn_v5", _SOURCE,
                       ["expert_ffn_fwd", "expert_ffn_grouped"],
                       ("-O3", "-march=native", "-fopenmp-simd"))



def kernel_available() -> bool:
    return _EXT.available()


def _act_(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Activation in place on a fresh temporary (gelu variants allocate)."""
    if activation == "relu":
        return h.relu_()
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
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


# Path choice, measured with benchmarks/expert_ffn.py (2 threads, D=384/768, E=16/32).
# "fused" (C++ dot products, each selected weight row read once, no BLAS) wins in
# the decode regime, while the selected work is a few tokens' worth of the dense FFN.
FUSED_MAX_TOKENS = 16
FUSED_MAX_WORK = 4.0
# "grouped" runs one narrow GEMM pair per selected expert: it pays when the
# per-expert GEMMs are big enough (mean tokens per expert x expert width) and the
# selection sparse enough; narrower experts run slower, so the break-even fraction
# shrinks as sqrt(width / GROUPED_FULL_WIDTH) below that width.
GROUPED_MIN_BLOCK = 2048
GROUPED_MAX_ACTIVE = 0.5
GROUPED_FULL_WIDTH = 192
PATHS = ("fused", "shared", "grouped", "grouped_torch", "dense")


def choose_path(n: int, n_exp: int, hidden: int, pairs: int, shared: bool,
                fused_ok: bool) -> str:
    """The CPU path for ``n`` tokens selecting ``pairs`` of ``n * n_exp`` (token, expert)."""
    if fused_ok and 0 < n <= FUSED_MAX_TOKENS and pairs <= FUSED_MAX_WORK * n_exp:
        return "fused"
    if shared:
        return "shared"
    width = hidden / n_exp
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
        pairs = int(mask.sum())
        shared = n == 1 or pairs in (0, n * n_exp) or bool((mask == mask[:1]).all())
        path = choose_path(n, n_exp, hidden, pairs, shared, fused_ok and mod is not None)
    if path == "fused" and not (fused_ok and mod is not None and n > 0):
        path = "grouped"
    if path == "grouped" and mod is None:
        path = "grouped_torch"
    act = ACTIVATIONS.index(activation)
    empty = torch.empty(0)
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
