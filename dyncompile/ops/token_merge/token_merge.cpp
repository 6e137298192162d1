#include <torch/extension.h>

#include "common.h"

// token_merge: y[i, slot[i, t]] += size[i, t] * x[i, t] over the tokens t of row i,
// then each output row divided by its summed size. Work is split over (row, column
// block) pairs, so one row of a batch of one still runs on every thread with no two
// threads writing the same value. Accumulates in fp32 for every input dtype.
static constexpr int64_t kCols = 128;

template <typename T>
static void merge_rows(const T* x, const float* size, const int64_t* slot, int64_t rows,
                       int64_t tokens, int64_t width, int64_t n_out, T* y, float* total) {
  const int64_t blocks = (width + kCols - 1) / kCols;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> acc(static_cast<size_t>(n_out * kCols));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = p / blocks, c0 = (p % blocks) * kCols;
      const int64_t nc = std::min(kCols, width - c0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::vector<float> tot(static_cast<size_t>(n_out), 0.0f);
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slot[i * tokens + t];
        const float w = size[i * tokens + t];
        tot[s] += w;
        const T* xr = x + (i * tokens + t) * width + c0;
        float* ar = acc.data() + s * kCols;
        #pragma omp simd
        for (int64_t j = 0; j < nc; ++j) ar[j] += w * static_cast<float>(xr[j]);
      }
      for (int64_t s = 0; s < n_out; ++s) {
        const float inv = 1.0f / std::max(tot[s], 1e-30f);
        const float* ar = acc.data() + s * kCols;
        T* yr = y + (i * n_out + s) * width + c0;
        #pragma omp simd
        for (int64_t j = 0; j < nc; ++j) yr[j] = static_cast<T>(ar[j] * inv);
        if (c0 == 0) total[i * n_out + s] = tot[s];
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> token_merge_cpu(const torch::Tensor& x,
                                                         const torch::Tensor& size,
                                                         const torch::Tensor& slot,
                                                         int64_t n_out) {
  TORCH_CHECK(x.dim() == 3 && size.dim() == 2 && slot.dim() == 2,
              "token_merge: x [rows, tokens, width], size and slot [rows, tokens]");
  TORCH_CHECK(slot.scalar_type() == at::kLong, "token_merge: slot must be int64");
  const int64_t rows = x.size(0), tokens = x.size(1), width = x.size(2);
  TORCH_CHECK(size.size(0) == rows && size.size(1) == tokens && slot.size(0) == rows &&
              slot.size(1) == tokens, "token_merge: size and slot must be [rows, tokens]");
  auto xc = x.contiguous();
  auto sc = size.to(at::kFloat).contiguous();
  auto ic = slot.contiguous();
  auto y = torch::empty({rows, n_out, width}, x.options());
  auto total = torch::zeros({rows, n_out}, x.options().dtype(at::kFloat));
  if (rows == 0 || n_out == 0 || width == 0) return {y, total};
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t e = 0; e < rows * tokens; ++e)
    TORCH_CHECK(ip[e] >= 0 && ip[e] < n_out, "token_merge: slot out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_merge",
    [&] {
      merge_rows<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<float>(), ip, rows, tokens,
                           width, n_out, y.data_ptr<scalar_t>(), total.data_ptr<float>());
    });
  return {y, total};
}

// token_unmerge: y[i, t] = x[i, index[i, t]], one row copy per (row, token).
torch::Tensor token_unmerge_cpu(const torch::Tensor& x, const torch::Tensor& index) {
  TORCH_CHECK(x.dim() == 3 && index.dim() == 2 && index.size(0) == x.size(0),
              "token_unmerge: x [rows, n, width], index [rows, tokens]");
  TORCH_CHECK(index.scalar_type() == at::kLong, "token_unmerge: index must be int64");
  const int64_t rows = x.size(0), n = x.size(1), width = x.size(2), tokens = index.size(1);
  auto xc = x.contiguous();
  auto ic = index.contiguous();
  auto y = torch::empty({rows, tokens, width}, x.options());
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t e = 0; e < rows * tokens; ++e)
    TORCH_CHECK(ip[e] >= 0 && ip[e] < n, "token_unmerge: index out of range");
  const int64_t bytes = width * static_cast<int64_t>(x.element_size());
  const char* xp = static_cast<const char*>(xc.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  at::parallel_for(0, rows * tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(bytes, 1)),
                   [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t i = e / tokens;
      std::memcpy(yp + e * bytes, xp + (i * n + ip[e]) * bytes, static_cast<size_t>(bytes));
    }
  });
  return y;
}
