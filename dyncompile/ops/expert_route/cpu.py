"""CPU fast path of the router: scores and dynamic-k selection in as few passes as possible.

``route_mask`` computes ``select(router(x), tau)`` (``runtime.expert_fit``):
the first layer is one BLAS call with the ReLU applied in place; the second
layer (``hidden -> experts``, too narrow for BLAS to run well), its ReLU, the
row max and the threshold ``score >= tau * max`` are one C++ pass over the
tokens (vectorised dot products, four scores per read of a row). Scores agree with the
torch path to float rounding (the summation order differs), so a token whose
score sits within rounding of its threshold may select differently.
"""

from __future__ import annotations

import torch

from ..cpp_extension import DOT4, InlineExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
""" + DOT4 + r"""
// h [N, K] fp32 (ReLU applied), w2 [E, K], b2 [E]: mask[t, e] = s[t, e] >= tau * max_e s[t, e]
// with s = relu(h @ w2^T + b2). Each score is a dot product over K (vectorised, no branch).
torch::Tensor route_select(torch::Tensor h, torch::Tensor w2, torch::Tensor b2, double tau) {
  TORCH_CHECK(h.dim() == 2 && w2.dim() == 2 && h.size(1) == w2.size(1));
  h = h.contiguous(); w2 = w2.contiguous(); b2 = b2.contiguous();
  const int64_t n = h.size(0), k = h.size(1), e = w2.size(0);
  TORCH_CHECK(b2.numel() == e);
  auto mask = torch::empty({n, e}, h.options().dtype(at::kBool));
  const float* hp = h.data_ptr<float>();
  const float* wp = w2.data_ptr<float>();
  const float* bp = b2.data_ptr<float>();
  bool* mp = mask.data_ptr<bool>();
  const float t = static_cast<float>(tau);
  at::parallel_for(0, n, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(e);
    for (int64_t r = t0; r < t1; ++r) {
      const float* hr = hp + r * k;
      // Four scores at a time, the row read once (the last block repeats its last row).
      for (int64_t c = 0; c < e; c += 4) {
        const float* w[4];
        float v[4];
        for (int64_t q = 0; q < 4; ++q) w[q] = wp + std::min(c + q, e - 1) * k;
        dot4(w, hr, k, v);
        for (int64_t q = 0; q < 4 && c + q < e; ++q) s[c + q] = v[q];
      }
      float top = 0.0f;
      for (int64_t c = 0; c < e; ++c) {
        const float v = s[c] + bp[c];
        s[c] = v > 0.0f ? v : 0.0f;
        top = std::max(top, s[c]);
      }
      const float thr = t * top;
      bool* mr = mp + r * e;
      for (int64_t c = 0; c < e; ++c) mr[c] = s[c] >= thr;
    }
  });
  return mask;
}
"""

_EXT = InlineExtension("dyncompile_expert_route_v3", _SOURCE, ["route_select"],
                       ("-O3", "-march=native", "-fopenmp"))


def kernel_available() -> bool:
    return _EXT.load() is not None


def route_mask(fc1: torch.nn.Linear, fc2: torch.nn.Linear, x: torch.Tensor,
               tau: float) -> torch.Tensor | None:
    """Bool mask [N, E] of ``select(relu(fc2(relu(fc1(x)))), tau)``, or None where the fast
    path does not apply (not fp32 on CPU, or no C++ kernel)."""
    mod = _EXT.load()
    if mod is None or x.device.type != "cpu" or x.dtype != torch.float32 \
            or fc1.weight.dtype != torch.float32 or fc1.bias is None or fc2.bias is None:
        return None
    h = torch.addmm(fc1.bias, x, fc1.weight.t()).relu_()
    return mod.route_select(h, fc2.weight, fc2.bias, float(tau))
