#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

// Returns (y, union of kept channels, kept (token, channel) pairs, sparse path taken).
std::tuple<torch::Tensor, int64_t, int64_t, bool> cats_glu_fwd(
    torch::Tensor a, torch::Tensor x, torch::Tensor w_up, torch::Tensor b_up,
    torch::Tensor w_down_t, torch::Tensor b_down, double threshold,
    int64_t max_tokens, double max_active) {
  TORCH_CHECK(a.dim() == 2 && x.dim() == 2 && a.size(0) == x.size(0));
  TORCH_CHECK(w_up.size(0) == a.size(1) && w_up.size(1) == x.size(1));
  TORCH_CHECK(w_down_t.size(0) == a.size(1));
  a = a.contiguous();
  x = x.contiguous();
  const int64_t n = a.size(0), hid = a.size(1), d = x.size(1), out = w_down_t.size(1);
  const bool has_bu = b_up.defined() && b_up.numel() == hid;
  const bool has_bd = b_down.defined() && b_down.numel() == out;
  const float thr = static_cast<float>(threshold);
  const float* ap = a.data_ptr<float>();
  auto am_t = torch::empty({n, hid}, a.options());
  float* amp = am_t.data_ptr<float>();
  std::vector<uint8_t> on(static_cast<size_t>(hid), 0);
  int64_t pairs = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < hid; ++j) {
      const float v = ap[t * hid + j];
      const bool keep = std::fabs(v) >= thr;
      amp[t * hid + j] = keep ? v : 0.0f;
      pairs += keep;
      on[j] |= keep;
    }
  }
  std::vector<int64_t> idx;
  idx.reserve(hid);
  for (int64_t j = 0; j < hid; ++j) if (on[j]) idx.push_back(j);
  const int64_t k = static_cast<int64_t>(idx.size());
  if (n > max_tokens || k > max_active * hid || !w_up.is_contiguous() ||
      !w_down_t.is_contiguous()) {
    auto u = has_bu ? at::addmm(b_up, x, w_up.t()) : at::mm(x, w_up.t());
    auto h = am_t * u;
    auto y = has_bd ? at::addmm(b_down, h, w_down_t) : at::mm(h, w_down_t);
    return std::make_tuple(y, k, pairs, false);
  }
  const float* xp = x.data_ptr<float>();
  const float* up = w_up.data_ptr<float>();
  const float* dp = w_down_t.data_ptr<float>();
  const float* bup = has_bu ? b_up.data_ptr<float>() : nullptr;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   (k + 31) / 32));
  std::vector<float> acc(static_cast<size_t>(threads) * n * out, 0.0f);
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      const int64_t r0 = k * tid / threads, r1 = k * (tid + 1) / threads;
      float* acc_t = acc.data() + static_cast<size_t>(tid) * n * out;
      int64_t r = r0;
      // Four kept channels at a time: four up dots, then one pass over the accumulator.
      for (; r + 4 <= r1; r += 4) {
        const int64_t j[4] = {idx[r], idx[r + 1], idx[r + 2], idx[r + 3]};
        for (int64_t t = 0; t < n; ++t) {
          float h[4];
          bool any = false;
          const float* xr = xp + t * d;
          for (int q = 0; q < 4; ++q) {
            const float c = amp[t * hid + j[q]];
            h[q] = 0.0f;
            if (c == 0.0f) continue;
            const float* wu = up + j[q] * d;
            float s = 0.0f;
            #pragma GCC ivdep
            for (int64_t i = 0; i < d; ++i) s += xr[i] * wu[i];
            h[q] = c * (s + (bup ? bup[j[q]] : 0.0f));
            any = true;
          }
          if (!any) continue;
          const float *d0 = dp + j[0] * out, *d1 = dp + j[1] * out;
          const float *d2 = dp + j[2] * out, *d3 = dp + j[3] * out;
          float* yr = acc_t + t * out;
          #pragma GCC ivdep
          for (int64_t o = 0; o < out; ++o)
            yr[o] += h[0] * d0[o] + h[1] * d1[o] + h[2] * d2[o] + h[3] * d3[o];
        }
      }
      for (; r < r1; ++r) {
        const int64_t j = idx[r];
        const float* wu = up + j * d;
        const float* wd = dp + j * out;
        for (int64_t t = 0; t < n; ++t) {
          const float c = amp[t * hid + j];
          if (c == 0.0f) continue;
          const float* xr = xp + t * d;
          float s = 0.0f;
          #pragma GCC ivdep
          for (int64_t i = 0; i < d; ++i) s += xr[i] * wu[i];
          const float h = c * (s + (bup ? bup[j] : 0.0f));
          float* yr = acc_t + t * out;
          #pragma GCC ivdep
          for (int64_t o = 0; o < out; ++o) yr[o] += h * wd[o];
        }
      }
    }
  });
  auto y = torch::empty({n, out}, a.options());
  float* yp = y.data_ptr<float>();
  const float* bdp = has_bd ? b_down.data_ptr<float>() : nullptr;
  fold_accumulators(acc, threads, n * out, out, bdp, yp);
  return std::make_tuple(y, k, pairs, true);
}
