#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

// y[n, out] = (x * (|x| >= thr)) @ wt + bias, wt input-major [in, out].
// Returns (y, union of active channels, active (token, channel) pairs, sparse path taken).
std::tuple<torch::Tensor, int64_t, int64_t, bool> sparse_linear_fwd(
    torch::Tensor x, torch::Tensor wt, torch::Tensor bias, double threshold,
    int64_t max_tokens, double max_active, int64_t rows_always) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat && wt.scalar_type() == at::kFloat);
  x = x.contiguous();
  const int64_t n = x.size(0), in = x.size(1), out = wt.size(1);
  const bool has_bias = bias.defined() && bias.numel() == out;
  const float thr = static_cast<float>(threshold);
  const float* xp = x.data_ptr<float>();
  // One serial pass: the masked input, the union of active channels, the pair count.
  auto kept_t = torch::empty({n, in}, x.options());
  float* kp = kept_t.data_ptr<float>();
  std::vector<uint8_t> on(static_cast<size_t>(in), 0);
  int64_t pairs = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float* row = xp + t * in;
    float* krow = kp + t * in;
    for (int64_t i = 0; i < in; ++i) {
      const bool a = std::fabs(row[i]) >= thr;
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
    auto y = has_bias ? at::addmm(bias, kept_t, wt) : at::mm(kept_t, wt);
    return std::make_tuple(y, k, pairs, false);
  }
  const float* wp = wt.data_ptr<float>();
  std::vector<float> coef(static_cast<size_t>(k * n));
  for (int64_t r = 0; r < k; ++r)
    for (int64_t t = 0; t < n; ++t) coef[r * n + t] = kp[t * in + idx[r]];
  // Torch's own thread pool (at::parallel_for), never a second OpenMP runtime.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   (k + 63) / 64));
  std::vector<float> acc(static_cast<size_t>(threads) * n * out, 0.0f);
  // Each chunk accumulates its share of the active rows into a private buffer:
  // every weight row is read once and no output column block is left idle.
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      const int64_t r0 = k * tid / threads, r1 = k * (tid + 1) / threads;
      float* a = acc.data() + static_cast<size_t>(tid) * n * out;
      int64_t r = r0;
      // Four rows at a time: four weight streams in flight, one accumulator pass.
      for (; r + 4 <= r1; r += 4) {
        const float* w0 = wp + idx[r] * out;
        const float* w1 = wp + idx[r + 1] * out;
        const float* w2 = wp + idx[r + 2] * out;
        const float* w3 = wp + idx[r + 3] * out;
        for (int64_t t = 0; t < n; ++t) {
          const float c0 = coef[r * n + t], c1 = coef[(r + 1) * n + t];
          const float c2 = coef[(r + 2) * n + t], c3 = coef[(r + 3) * n + t];
          if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;
          float* at_row = a + t * out;
          #pragma GCC ivdep
          for (int64_t j = 0; j < out; ++j)
            at_row[j] += c0 * w0[j] + c1 * w1[j] + c2 * w2[j] + c3 * w3[j];
        }
      }
      for (; r < r1; ++r) {
        const float* w = wp + idx[r] * out;
        for (int64_t t = 0; t < n; ++t) {
          const float c = coef[r * n + t];
          if (c == 0.0f) continue;
          float* at_row = a + t * out;
          #pragma GCC ivdep
          for (int64_t j = 0; j < out; ++j) at_row[j] += c * w[j];
        }
      }
    }
  });
  auto y = torch::empty({n, out}, x.options());
  float* yp = y.data_ptr<float>();
  const float* bp = has_bias ? bias.contiguous().to(at::kFloat).data_ptr<float>() : nullptr;
  fold_accumulators(acc, threads, n * out, out, bp, yp);
  return std::make_tuple(y, k, pairs, true);
}
