"""CPU kernel of token_mean: one thread, for the small streams a fused exit check reads.

An exit check that compares exit 1 with the exit-0 state needs that state's token
mean inside the fused check graph. Left to Inductor, the reduction lands in the
check's tail kernel and makes it parallel: on one 128-token row, waking the
second thread there costs more than the sum itself (about 200 us of the check,
against about 100 us for the other exits). This kernel sums the rows serially
while they are still in cache; larger inputs (more than ``SERIAL_MAX`` values)
take torch's parallel mean. Registered with the dispatcher from C++ when it
builds, so a compiled graph reaches it without a Python frame.
"""

from __future__ import annotations

from ..cpp_extension import InlineExtension

SERIAL_MAX = 1 << 18  # values; above this, torch's (parallel) mean

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/library.h>

torch::Tensor token_mean_cpu(const torch::Tensor& x) {
  if (x.scalar_type() != at::kFloat || x.dim() != 3 || x.numel() > SERIAL_MAX ||
      x.size(1) == 0)
    return x.to(at::kFloat).mean(1);
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), tokens = xc.size(1), width = xc.size(2);
  auto y = torch::zeros({rows, width}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float inv = 1.0f / static_cast<float>(tokens);
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = yp + r * width;
    for (int64_t t = 0; t < tokens; ++t) {
      const float* xr = xp + (r * tokens + t) * width;
      #pragma omp simd
      for (int64_t j = 0; j < width; ++j) yr[j] += xr[j];
    }
    #pragma omp simd
    for (int64_t j = 0; j < width; ++j) yr[j] *= inv;
  }
  return y;
}

TORCH_LIBRARY_IMPL(dyncompile, CPU, m) { m.impl("token_mean", &token_mean_cpu); }

int64_t token_mean_loaded() { return 1; }
""".replace("SERIAL_MAX", str(SERIAL_MAX))

_EXT = InlineExtension("dyncompile_token_mean_v1", _SOURCE, ["token_mean_loaded"],
                       ("-O3", "-march=native", "-fopenmp-simd"))


def kernel_available() -> bool:
    """Build (once) and register the C++ kernel; False without a compiler."""
    from . import op as _op  # noqa: F401  (the schema is defined before the kernel loads)

    return _EXT.load() is not None
