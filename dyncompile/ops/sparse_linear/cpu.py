"""CPU kernel: accumulate only the weight rows of active input channels.

For few tokens (the decode regime) a C++ kernel walks the union of active
channels once and adds ``x[t, i] * W_t[i, :]`` into each token's output, with
OpenMP over blocks of output columns (no atomics, no weight copy). It is
built on first use with ``torch.utils.cpp_extension.load_inline`` (cached
after); if no compiler is available a torch fallback gathers the active rows.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("dyncompile")

_SOURCE = r"""
#include <torch/extension.h>
#include <vector>
#include <cmath>

torch::Tensor sparse_rows_gemm(torch::Tensor x, torch::Tensor wt, torch::Tensor bias,
                               double threshold) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat && wt.scalar_type() == at::kFloat);
  x = x.contiguous();
  wt = wt.contiguous();
  const int64_t n = x.size(0), in = x.size(1), out = wt.size(1);
  const float thr = static_cast<float>(threshold);
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  std::vector<int64_t> idx;
  idx.reserve(in);
  for (int64_t i = 0; i < in; ++i) {
    for (int64_t t = 0; t < n; ++t) {
      if (std::fabs(xp[t * in + i]) >= thr) { idx.push_back(i); break; }
    }
  }
  const int64_t k = static_cast<int64_t>(idx.size());
  std::vector<float> coef(static_cast<size_t>(k * n));
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t t = 0; t < n; ++t) {
      float v = xp[t * in + idx[a]];
      coef[a * n + t] = std::fabs(v) >= thr ? v : 0.0f;
    }
  }
  auto y = bias.defined() && bias.numel() == out
      ? bias.to(at::kFloat).reshape({1, out}).expand({n, out}).clone(at::MemoryFormat::Contiguous)
      : torch::zeros({n, out}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t block = 256;
  const int64_t nblocks = (out + block - 1) / block;
  #pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t c0 = b * block;
    const int64_t c1 = std::min(out, c0 + block);
    for (int64_t a = 0; a < k; ++a) {
      const float* wrow = wp + idx[a] * out;
      for (int64_t t = 0; t < n; ++t) {
        const float c = coef[a * n + t];
        if (c == 0.0f) continue;
        float* yrow = yp + t * out;
        #pragma omp simd
        for (int64_t j = c0; j < c1; ++j) yrow[j] += c * wrow[j];
      }
    }
  }
  return y;
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def _load():
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline

                os.environ.setdefault("MAX_JOBS", "2")
                _module = load_inline(
                    name="dyncompile_sparse_linear_v1", cpp_sources=[_SOURCE],
                    functions=["sparse_rows_gemm"],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # noqa: BLE001  (no compiler: use the torch fallback)
                log.warning("dyncompile: sparse_linear C++ kernel unavailable (%s); "
                            "using the torch fallback", e)
                _failed = True
    return _module


def sparse_rows_gemm(x2d: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                     threshold: float) -> torch.Tensor:
    """y[n, out] = sum over active rows i of masked x[:, i] * weight_t[i, :] (+ bias), fp32."""
    mod = _load() if x2d.dtype == torch.float32 and weight_t.dtype == torch.float32 else None
    if mod is not None:
        return mod.sparse_rows_gemm(x2d, weight_t,
                                    bias if bias is not None else torch.empty(0), threshold)
    mask = x2d.abs() >= threshold
    idx = mask.any(0).nonzero().flatten()
    coef = (x2d * mask).index_select(1, idx).float()
    y = coef @ weight_t.index_select(0, idx).float()
    if bias is not None:
        y = y + bias.float()
    return y


def kernel_available() -> bool:
    return _load() is not None
