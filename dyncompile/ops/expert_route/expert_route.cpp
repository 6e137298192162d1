#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

using dynvec::Vec;

// hr[i] = relu(h[r, i] + b1[i]) for the k values of row r of h.
static inline void hidden_row(const float* h, int64_t r, int64_t k, const float* b1, float* hr) {
  h += r * k;
  #pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    const float f = h[i] + b1[i];
    hr[i] = f > 0.0f ? f : 0.0f;
  }
}

// s[q * ep + c] = b2[c] + sum_i hr[q * k + i] * w2t[i * ep + c] for the q < rows (<= 4)
// rows of hr: each weight row is read once for the four tokens, whose sums are
// independent (32 padded experts: four tokens by 32 / kW vectors in registers).
static inline void scores4(const float* hr, int64_t rows, int64_t k, const float* w2t,
                           const float* b2, int64_t ep, float* s) {
  if (ep == 32 && rows == 4) {
    constexpr int NV = 32 / dynvec::kW, W = dynvec::kW;
    Vec a[4][NV];
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < NV; ++j) a[q][j] = Vec::loadu(b2 + j * W);
    for (int64_t i = 0; i < k; ++i) {
      Vec w[NV];
      for (int j = 0; j < NV; ++j) w[j] = Vec::loadu(w2t + i * 32 + j * W);
      for (int q = 0; q < 4; ++q) {
        const Vec v(hr[q * k + i]);
        for (int j = 0; j < NV; ++j) a[q][j] = at::vec::fmadd(v, w[j], a[q][j]);
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < NV; ++j) a[q][j].store(s + q * 32 + j * W);
    return;
  }
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

// mask[q, c] = s[q, c] >= tau * max_c s[q, c] for the rows of relu(hr @ w2t + b2), s the
// scratch for the padded scores.
static inline void select_hidden(const float* hr, int64_t rows, int64_t k, const float* w2t,
                                 const float* b2, int64_t e, int64_t ep, float tau, float* s,
                                 bool* m) {
  scores4(hr, rows, k, w2t, b2, ep, s);
  for (int64_t q = 0; q < rows; ++q) {
    float* sp = s + q * ep;
    float top = 0.0f;
    for (int64_t c = 0; c < e; ++c) {
      sp[c] = sp[c] > 0.0f ? sp[c] : 0.0f;
      top = std::max(top, sp[c]);
    }
    const float thr = tau * top;
    for (int64_t c = 0; c < e; ++c) m[q * e + c] = sp[c] >= thr;
  }
}

static void select_rows(const float* hv, const float* b1, const float* w2t, const float* b2,
                        int64_t k, int64_t e, int64_t ep, float tau, bool* mp, int64_t r0,
                        int64_t r1) {
  std::vector<float> hr(4 * k), s(4 * ep);
  for (int64_t r = r0; r < r1; r += 4) {
    const int64_t rows = std::min<int64_t>(4, r1 - r);
    for (int64_t q = 0; q < rows; ++q) hidden_row(hv, r + q, k, b1, hr.data() + q * k);
    select_hidden(hr.data(), rows, k, w2t, b2, e, ep, tau, s.data(), mp + r * e);
  }
}

// h [N, K] (x @ w1^T without its bias, fp32), b1 [K], w2t [K, EP] (the second layer
// transposed, experts padded to EP with zeros), b2 [EP]:
// mask[t, e] = s[t, e] >= tau * max_e s[t, e] with s = relu(relu(h + b1) @ w2t + b2), e < E.
torch::Tensor route_select(torch::Tensor h, torch::Tensor b1, torch::Tensor w2t,
                           torch::Tensor b2, int64_t e, double tau) {
  TORCH_CHECK(h.dim() == 2 && w2t.dim() == 2 && h.size(1) == w2t.size(0));
  TORCH_CHECK(b1.numel() == h.size(1) && b2.numel() == w2t.size(1) && e <= w2t.size(1));
  TORCH_CHECK(h.scalar_type() == at::kFloat);
  h = h.contiguous(); b1 = b1.contiguous(); w2t = w2t.contiguous(); b2 = b2.contiguous();
  const int64_t n = h.size(0), k = h.size(1), ep = w2t.size(1);
  auto mask = torch::empty({n, e}, h.options().dtype(at::kBool));
  const float* hp = h.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  const float* wp = w2t.data_ptr<float>();
  const float* bp = b2.data_ptr<float>();
  bool* mp = mask.data_ptr<bool>();
  const float t = static_cast<float>(tau);
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    select_rows(hp, b1p, wp, bp, k, e, ep, t, mp, r0, r1);
  });
  return mask;
}

// ---------------------------------------------------------------------------
// The whole router in one pass over the tokens (no matmul call: for a few hundred
// tokens the parallel regions of a library matmul and of the bf16 cast cost more than
// the layer). Four tokens at a time against the first layer's packed weights, register
// tiles of four tokens by 64 hidden units:
// - fp32: w1p [D, KP] (w1 transposed, hidden padded to KP, a multiple of 64), one FMA
//   per (token, input, 16 units);
// - bf16: w1p [ceil(D/2), KP, 2] bf16 (pairs of inputs side by side, as the bf16 dot
//   product instruction takes them), the tokens cast to bf16 (round to nearest even)
//   four rows at a time, fp32 accumulation.

// (fp32 first layer, native bf16 first layer) in this build, and the vector class it
// uses. Without native bf16 dot products the bf16 router runs the fp32 first layer on
// bf16-rounded weights and tokens (the same products, exact in fp32).
std::tuple<bool, bool, std::string> first_layer_kinds() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const bool b16 = true;
#else
  const bool b16 = false;
#endif
  return std::make_tuple(true, b16, std::string(dynvec::isa()));
}

// h[q, c] = x[rows[q]] . w1[c] for q < 4 and c < kp (rows repeat the last real one
// past the end; their sums are not used): register tiles of four tokens by kTileCols
// hidden units.
static void layer1_f32(const float* const* xr, int64_t d, const float* w1p, int64_t kp,
                       float* h) {
  constexpr int NV = dynvec::kTileCols / dynvec::kW, W = dynvec::kW;
  for (int64_t c0 = 0; c0 < kp; c0 += dynvec::kTileCols) {
    Vec a[4][NV];
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < NV; ++j) a[q][j] = Vec(0.0f);
    for (int64_t i = 0; i < d; ++i) {
      const float* w = w1p + i * kp + c0;
      Vec wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = Vec::loadu(w + j * W);
      for (int q = 0; q < 4; ++q) {
        const Vec v(xr[q][i]);
        for (int j = 0; j < NV; ++j) a[q][j] = at::vec::fmadd(v, wv[j], a[q][j]);
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < NV; ++j) a[q][j].store(h + q * kp + c0 + j * W);
  }
}

// xs[q, :d] = float(bf16(x[q, :d])) (round to nearest even): the tokens as the bf16
// router sees them, for the fp32 first layer on bf16-rounded weights.
static void round_rows_bf16(const float* const* xr, int64_t d, float* xs) {
  for (int q = 0; q < 4; ++q)
    for (int64_t i = 0; i < d; ++i)
      xs[q * d + i] = static_cast<float>(c10::BFloat16(xr[q][i]));
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// The same from bf16 pairs: xb [4, ld] (u32 = two bf16 inputs), w1p [dp2, kp, 2] bf16.
static void layer1_bf16(const uint32_t* xb, int64_t ld, int64_t dp2, const uint16_t* w1p,
                        int64_t kp, float* h) {
  for (int64_t c0 = 0; c0 < kp; c0 += 64) {
    __m512 a[4][4];
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 4; ++j) a[q][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < dp2; ++i) {
      const uint16_t* w = w1p + (i * kp + c0) * 2;
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
      const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
      const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
      for (int q = 0; q < 4; ++q) {
        const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(xb[q * ld + i]));
        a[q][0] = _mm512_dpbf16_ps(a[q][0], v, w0);
        a[q][1] = _mm512_dpbf16_ps(a[q][1], v, w1);
        a[q][2] = _mm512_dpbf16_ps(a[q][2], v, w2);
        a[q][3] = _mm512_dpbf16_ps(a[q][3], v, w3);
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(h + q * kp + c0 + 16 * j, a[q][j]);
  }
}

// xb[q, :] = bf16(x[q, :d]) (round to nearest even), zero past d; ld u32 per row, ld * 2
// a multiple of 16 at least d.
static void cast_rows_bf16(const float* const* xr, int64_t d, uint32_t* xb, int64_t ld) {
  for (int q = 0; q < 4; ++q) {
    uint16_t* o = reinterpret_cast<uint16_t*>(xb + q * ld);
    for (int64_t i = 0; i < 2 * ld; i += 16) {
      const int64_t c = std::max<int64_t>(0, std::min<int64_t>(16, d - i));
      const __mmask16 m = c >= 16 ? static_cast<__mmask16>(0xFFFF)
                                  : static_cast<__mmask16>((1u << c) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(m, xr[q] + std::min<int64_t>(i, d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}
#endif

// x [N, D] fp32; w1p packed as above (fp32 [D, KP] or bf16 [ceil(D/2), KP, 2]); b1 [K];
// w2t [K, EP], b2 [EP] as in route_select. The same mask as route_select on x @ w1^T.
// With ``round_x`` (fp32 w1p only) the tokens are rounded to bf16 first.
torch::Tensor route_tokens(torch::Tensor x, torch::Tensor w1p, torch::Tensor b1,
                           torch::Tensor w2t, torch::Tensor b2, int64_t e, double tau,
                           int64_t grain, bool round_x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat);
  const bool bf = w1p.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf ? w1p.dim() == 3 : w1p.dim() == 2);
  x = x.contiguous(); w1p = w1p.contiguous(); b1 = b1.contiguous();
  w2t = w2t.contiguous(); b2 = b2.contiguous();
  const int64_t n = x.size(0), d = x.size(1), k = b1.numel(), ep = w2t.size(1);
  const int64_t kp = w1p.size(1);
  TORCH_CHECK(kp % 64 == 0 && kp >= k && w2t.size(0) == k && b2.numel() == ep && e <= ep);
  TORCH_CHECK(bf ? w1p.size(0) == (d + 1) / 2 && w1p.size(2) == 2 : w1p.size(0) == d);
  auto mask = torch::empty({n, e}, x.options().dtype(at::kBool));
  const float* xp = x.data_ptr<float>();
  const float* b1p = b1.data_ptr<float>();
  const float* wp = w2t.data_ptr<float>();
  const float* bp = b2.data_ptr<float>();
  bool* mp = mask.data_ptr<bool>();
  const float t = static_cast<float>(tau);
  const void* w1v = w1p.data_ptr();
  at::parallel_for(0, n, std::max<int64_t>(1, grain), [&](int64_t r0, int64_t r1) {
    const int64_t ld = (d + 15) / 16 * 8;  // u32 per cast row
    std::vector<float> h(4 * kp), hr(4 * k), s(4 * ep);
    std::vector<uint32_t> xb(4 * ld);
    std::vector<float> xs(round_x ? 4 * d : 0);
    for (int64_t r = r0; r < r1; r += 4) {
      const int64_t rows = std::min<int64_t>(4, r1 - r);
      const float* xr[4];
      for (int q = 0; q < 4; ++q) xr[q] = xp + (r + std::min<int64_t>(q, rows - 1)) * d;
      if (bf) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        cast_rows_bf16(xr, d, xb.data(), ld);
        layer1_bf16(xb.data(), ld, (d + 1) / 2, static_cast<const uint16_t*>(w1v), kp, h.data());
#else
        TORCH_CHECK(false, "route_tokens: no bf16 first layer in this build");
#endif
      } else if (round_x) {
        round_rows_bf16(xr, d, xs.data());
        const float* xq[4] = {xs.data(), xs.data() + d, xs.data() + 2 * d, xs.data() + 3 * d};
        layer1_f32(xq, d, static_cast<const float*>(w1v), kp, h.data());
      } else {
        layer1_f32(xr, d, static_cast<const float*>(w1v), kp, h.data());
      }
      for (int64_t q = 0; q < rows; ++q)
        for (int64_t i = 0; i < k; ++i) {
          const float f = h[q * kp + i] + b1p[i];
          hr[q * k + i] = f > 0.0f ? f : 0.0f;
        }
      select_hidden(hr.data(), rows, k, wp, bp, e, ep, t, s.data(), mp + r * e);
    }
  });
  return mask;
}
