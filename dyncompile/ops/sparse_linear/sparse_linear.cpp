#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"

// Weight element -> float, written so the compiler vectorizes the loops that use it on
// every instruction set (AVX2, AVX-512, NEON, SVE): bf16 is the top half of a float.
static inline float widen(float v) { return v; }
static inline float widen(at::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
static inline float widen(at::Half v) { return static_cast<float>(v); }

// acc[tid][t, :] += sum over this chunk's active rows r of coef[r, t] * wt[idx[r], :]
// (fp32 accumulation whatever the weight type). Each chunk has a private accumulator:
// every active weight row is read once and no output column block is left idle.
template <typename W>
static void accumulate_rows(const W* wp, const std::vector<int64_t>& idx,
                            const std::vector<float>& coef, int64_t n, int64_t out,
                            int64_t threads, std::vector<float>& acc) {
  const int64_t k = static_cast<int64_t>(idx.size());
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      const int64_t r0 = k * tid / threads, r1 = k * (tid + 1) / threads;
      float* a = acc.data() + static_cast<size_t>(tid) * n * out;
      int64_t r = r0;
      // Four rows at a time: four weight streams in flight, one accumulator pass.
      for (; r + 4 <= r1; r += 4) {
        const W* w0 = wp + idx[r] * out;
        const W* w1 = wp + idx[r + 1] * out;
        const W* w2 = wp + idx[r + 2] * out;
        const W* w3 = wp + idx[r + 3] * out;
        for (int64_t t = 0; t < n; ++t) {
          const float c0 = coef[r * n + t], c1 = coef[(r + 1) * n + t];
          const float c2 = coef[(r + 2) * n + t], c3 = coef[(r + 3) * n + t];
          if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;
          float* at_row = a + t * out;
          #pragma GCC ivdep
          for (int64_t j = 0; j < out; ++j)
            at_row[j] += c0 * widen(w0[j]) + c1 * widen(w1[j]) + c2 * widen(w2[j]) +
                         c3 * widen(w3[j]);
        }
      }
      for (; r < r1; ++r) {
        const W* w = wp + idx[r] * out;
        for (int64_t t = 0; t < n; ++t) {
          const float c = coef[r * n + t];
          if (c == 0.0f) continue;
          float* at_row = a + t * out;
          #pragma GCC ivdep
          for (int64_t j = 0; j < out; ++j) at_row[j] += c * widen(w[j]);
        }
      }
    }
  });
}

// y[n, out] = (x * (|x| * scale >= thr)) @ wt + bias, wt input-major [in, out] in fp32,
// bf16 or fp16; x in any of those; scale fp32 [in] or empty (all ones); the sum in fp32,
// y in x's dtype.
// Returns (y, union of active channels, active (token, channel) pairs, sparse path taken).
// `row_threshold` (fp32 [n], or empty): one threshold per token in place of `threshold`.
// Without `gemm`, a call that does not skip rows returns the masked input (fp32) in place
// of y, for the caller's own dense kernel.
std::tuple<torch::Tensor, int64_t, int64_t, bool> sparse_linear_fwd(
    torch::Tensor x, torch::Tensor wt, torch::Tensor bias, torch::Tensor scale,
    double threshold, int64_t max_tokens, double max_active, int64_t rows_always,
    bool gemm, torch::Tensor row_threshold) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0));
  const auto wtype = wt.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || wtype == at::kBFloat16 || wtype == at::kHalf,
              "sparse_linear: weights in fp32, bf16 or fp16");
  const auto out_type = x.scalar_type();
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t n = xf.size(0), in = xf.size(1), out = wt.size(1);
  const bool has_bias = bias.defined() && bias.numel() == out;
  const float thr = static_cast<float>(threshold);
  const float* xp = xf.data_ptr<float>();
  const bool scaled = scale.defined() && scale.numel() == in;
  auto sf = scaled ? scale.to(at::kFloat).contiguous() : torch::Tensor();
  const float* sp = scaled ? sf.data_ptr<float>() : nullptr;
  const bool per_row = row_threshold.defined() && row_threshold.numel() == n;
  auto rf = per_row ? row_threshold.to(at::kFloat).contiguous() : torch::Tensor();
  const float* rp = per_row ? rf.data_ptr<float>() : nullptr;
  // One serial pass: the masked input, the union of active channels, the pair count.
  auto kept_t = torch::empty({n, in}, xf.options());
  float* kp = kept_t.data_ptr<float>();
  std::vector<uint8_t> on(static_cast<size_t>(in), 0);
  int64_t pairs = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float* row = xp + t * in;
    float* krow = kp + t * in;
    const float tt = rp ? rp[t] : thr;
    for (int64_t i = 0; i < in; ++i) {
      const bool a = std::fabs(row[i]) * (sp ? sp[i] : 1.0f) >= tt;
      krow[i] = a ? row[i] : 0.0f;
      pairs += a;
      on[i] |= a;
    }
  }
  std::vector<int64_t> idx;
  idx.reserve(in);
  for (int64_t i = 0; i < in; ++i) if (on[i]) idx.push_back(i);
  const int64_t k = static_cast<int64_t>(idx.size());
  // Up to rows_always tokens the row walk beats a GEMM even with every row active.
  if (n > max_tokens || (k > max_active * in && n > rows_always) || !wt.is_contiguous()) {
    if (!gemm) return std::make_tuple(kept_t, k, pairs, false);
    auto kept = kept_t.to(wtype);
    auto y = has_bias ? at::addmm(bias.to(wtype), kept, wt) : at::mm(kept, wt);
    return std::make_tuple(y.to(out_type), k, pairs, false);
  }
  std::vector<float> coef(static_cast<size_t>(k * n));
  for (int64_t r = 0; r < k; ++r)
    for (int64_t t = 0; t < n; ++t) coef[r * n + t] = kp[t * in + idx[r]];
  // Torch's own thread pool (at::parallel_for), never a second OpenMP runtime.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   (k + 63) / 64));
  std::vector<float> acc(static_cast<size_t>(threads) * n * out, 0.0f);
  if (wtype == at::kFloat)
    accumulate_rows(wt.data_ptr<float>(), idx, coef, n, out, threads, acc);
  else if (wtype == at::kBFloat16)
    accumulate_rows(wt.data_ptr<at::BFloat16>(), idx, coef, n, out, threads, acc);
  else
    accumulate_rows(wt.data_ptr<at::Half>(), idx, coef, n, out, threads, acc);
  auto y = torch::empty({n, out}, xf.options());
  float* yp = y.data_ptr<float>();
  auto bf = has_bias ? bias.to(at::kFloat).contiguous() : torch::Tensor();
  fold_accumulators(acc, threads, n * out, out, has_bias ? bf.data_ptr<float>() : nullptr, yp);
  return std::make_tuple(out_type == at::kFloat ? y : y.to(out_type), k, pairs, true);
}
