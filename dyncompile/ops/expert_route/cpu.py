"""CPU fast path of the router: scores and dynamic-k selection in as few passes as possible.

``route_mask`` computes ``select(router(x), tau)`` (``runtime.expert_fit``):
the first layer is one matmul without its bias (in bf16 with fp32 accumulation
when asked: a CPU with native bf16 dot products runs it in about half the
time); then one C++ pass over the tokens adds the first bias, applies the ReLU,
runs the second layer (``hidden -> experts``, too narrow for BLAS to run well:
four tokens at a time against the transposed weights, no horizontal sums), its
ReLU, the row max and the threshold ``score >= tau * max``. In fp32 the scores
agree with the torch path to float rounding (the summation order differs), so
a token whose score sits within rounding of its threshold may select
differently; in bf16 they agree with ``router_scores(..., bf16=True)``.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from ..cpp_extension import InlineExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// hr[i] = relu(h[r, i] + b1[i]) for the k values of row r of h (bf16 or fp32).
template <bool BF16>
static inline void hidden_row(const void* hv, int64_t r, int64_t k, const float* b1, float* hr) {
  if (BF16) {
    const uint16_t* h = static_cast<const uint16_t*>(hv) + r * k;
    #pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const uint32_t u = static_cast<uint32_t>(h[i]) << 16;  // bf16 -> fp32 is a shift
      float f;
      std::memcpy(&f, &u, sizeof(f));
      f += b1[i];
      hr[i] = f > 0.0f ? f : 0.0f;
    }
  } else {
    const float* h = static_cast<const float*>(hv) + r * k;
    #pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const float f = h[i] + b1[i];
      hr[i] = f > 0.0f ? f : 0.0f;
    }
  }
}

// s[q * ep + c] = b2[c] + sum_i hr[q * k + i] * w2t[i * ep + c] for the q < rows (<= 4)
// rows of hr: each weight row is read once for the four tokens, whose sums are
// independent (eight accumulators in registers for 32 padded experts).
static inline void scores4(const float* hr, int64_t rows, int64_t k, const float* w2t,
                           const float* b2, int64_t ep, float* s) {
#if defined(__AVX512F__)
  if (ep == 32 && rows == 4) {
    __m512 a[8];
    for (int q = 0; q < 4; ++q) {
      a[2 * q] = _mm512_loadu_ps(b2);
      a[2 * q + 1] = _mm512_loadu_ps(b2 + 16);
    }
    for (int64_t i = 0; i < k; ++i) {
      const __m512 w0 = _mm512_loadu_ps(w2t + i * 32), w1 = _mm512_loadu_ps(w2t + i * 32 + 16);
      for (int q = 0; q < 4; ++q) {
        const __m512 v = _mm512_set1_ps(hr[q * k + i]);
        a[2 * q] = _mm512_fmadd_ps(v, w0, a[2 * q]);
        a[2 * q + 1] = _mm512_fmadd_ps(v, w1, a[2 * q + 1]);
      }
    }
    for (int q = 0; q < 4; ++q) {
      _mm512_storeu_ps(s + q * 32, a[2 * q]);
      _mm512_storeu_ps(s + q * 32 + 16, a[2 * q + 1]);
    }
    return;
  }
#endif
  for (int64_t q = 0; q < rows; ++q) {
    float* sp = s + q * ep;
    std::memcpy(sp, b2, sizeof(float) * ep);
    for (int64_t i = 0; i < k; ++i) {
      const float v = hr[q * k + i];
      if (v == 0.0f) continue;
      const float* w = w2t + i * ep;
      #pragma omp simd
      for (int64_t c = 0; c < ep; ++c) sp[c] += v * w[c];
    }
  }
}

template <bool BF16>
static void select_rows(const void* hv, const float* b1, const float* w2t, const float* b2,
                        int64_t k, int64_t e, int64_t ep, float tau, bool* mp, int64_t r0,
                        int64_t r1) {
  std::vector<float> hr(4 * k), s(4 * ep);
  for (int64_t r = r0; r < r1; r += 4) {
    const int64_t rows = std::min<int64_t>(4, r1 - r);
    for (int64_t q = 0; q < rows; ++q) hidden_row<BF16>(hv, r + q, k, b1, hr.data() + q * k);
    scores4(hr.data(), rows, k, w2t, b2, ep, s.data());
    for (int64_t q = 0; q < rows; ++q) {
      float* sp = s.data() + q * ep;
      float top = 0.0f;
      for (int64_t c = 0; c < e; ++c) {
        sp[c] = sp[c] > 0.0f ? sp[c] : 0.0f;
        top = std::max(top, sp[c]);
      }
      const float thr = tau * top;
      bool* m = mp + (r + q) * e;
      for (int64_t c = 0; c < e; ++c) m[c] = sp[c] >= thr;
    }
  }
}

// h [N, K] (x @ w1^T without its bias; fp32 or bf16), b1 [K], w2t [K, EP] (the second
// layer transposed, experts padded to EP with zeros), b2 [EP]:
// mask[t, e] = s[t, e] >= tau * max_e s[t, e] with s = relu(relu(h + b1) @ w2t + b2), e < E.
torch::Tensor route_select(torch::Tensor h, torch::Tensor b1, torch::Tensor w2t,
                           torch::Tensor b2, int64_t e, double tau) {
  TORCH_CHECK(h.dim() == 2 && w2t.dim() == 2 && h.size(1) == w2t.size(0));
  TORCH_CHECK(b1.numel() == h.size(1) && b2.numel() == w2t.size(1) && e <= w2t.size(1));
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16);
  h = h.contiguous(); b1 = b1.contiguous(); w2t = w2t.contiguous(); b2 = b2.contiguous();
  const int64_t n = h.size(0), k = h.size(1), ep = w2t.size(1);
  auto mask = torch::empty({n, e}, h.options().dtype(at::kBool));
  const bool bf = h.scalar_type() == at::kBFloat16;
  const void* hp = h.data_ptr();
  const float* b1p = b1.data_ptr<float>();
  const float* wp = w2t.data_ptr<float>();
  const float* bp = b2.data_ptr<float>();
  bool* mp = mask.data_ptr<bool>();
  const float t = static_cast<float>(tau);
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    if (bf) select_rows<true>(hp, b1p, wp, bp, k, e, ep, t, mp, r0, r1);
    else select_rows<false>(hp, b1p, wp, bp, k, e, ep, t, mp, r0, r1);
  });
  return mask;
}
"""

_EXT = InlineExtension("dyncompile_expert_route_v4", _SOURCE, ["route_select"],
                       ("-O3", "-march=native", "-fopenmp"))


def kernel_available() -> bool:
    return _EXT.load() is not None


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (a bf16 matmul is then about twice
    as fast as fp32; elsewhere it is emulated and slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


# Per router: (its parameters and their versions, the bf16 first layer, the padded transposed
# second layer and bias), so a call never converts a weight.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared(fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
    params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    versions = tuple(-1 if p is None else int(p._version) for p in params)
    got = _PREPARED.get(fc2)
    if got is None or got[1] != versions or any(a is not b for a, b in zip(got[0], params)):
        e, k = fc2.weight.shape
        ep = -(-e // 16) * 16
        w2t = torch.zeros(k, ep)
        w2t[:, :e] = fc2.weight.detach().t()
        b2 = torch.zeros(ep)
        if fc2.bias is not None:
            b2[:e] = fc2.bias.detach()
        got = (params, versions, fc1.weight.detach().to(torch.bfloat16).contiguous(), w2t, b2)
        _PREPARED[fc2] = got
    return got[2:]


def router_scores(fc1: torch.nn.Linear, fc2: torch.nn.Linear, x: torch.Tensor,
                  bf16: bool) -> torch.Tensor:
    """``relu(fc2(relu(fc1(x))))`` as the fast path computes it: with ``bf16``, the first
    layer's matmul takes bf16 operands (its bias and everything after stay fp32)."""
    if not bf16:
        return torch.relu(fc2(torch.relu(fc1(x))))
    w1 = _prepared(fc1, fc2)[0]
    h = torch.mm(x.to(torch.bfloat16), w1.t()).float()
    if fc1.bias is not None:
        h = h + fc1.bias
    return torch.relu(fc2(torch.relu(h)))


def route_mask(fc1: torch.nn.Linear, fc2: torch.nn.Linear, x: torch.Tensor,
               tau: float, bf16: bool = False) -> torch.Tensor | None:
    """Bool mask [N, E] of ``select(router_scores(fc1, fc2, x, bf16), tau)``, or None where
    the fast path does not apply (not fp32 on CPU, or no C++ kernel)."""
    mod = _EXT.load()
    if mod is None or x.device.type != "cpu" or x.dtype != torch.float32 \
            or fc1.weight.dtype != torch.float32 or fc1.bias is None or fc2.bias is None:
        return None
    w1, w2t, b2 = _prepared(fc1, fc2)
    h = torch.mm(x.to(torch.bfloat16), w1.t()) if bf16 else F.linear(x, fc1.weight)
    return mod.route_select(h, fc1.bias.detach(), w2t, b2, int(fc2.weight.shape[0]), float(tau))
