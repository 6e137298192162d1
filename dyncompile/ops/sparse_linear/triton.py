"""Triton kernel for CUDA: split-K sparse GEMM over an input-major weight.

Grid: (output blocks, input blocks, tokens). A program loads one block of one
token's inputs; if none passes the threshold it returns without touching the
weight. Otherwise it loads only the active weight rows (masked loads skip
memory for inactive rows), multiplies in fp32 and atomically adds its partial
sums into an fp32 output. Each token has its own row of the grid, so results
are correct for any number of tokens (the union of active channels is never
assumed). Tested on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_gemv_kernel(x_ptr, w_ptr, y_ptr, s_ptr, threshold, n_in, n_out,
                        stride_xt, stride_wk, stride_yt,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < n_in
    x = tl.load(x_ptr + t * stride_xt + offs_k, mask=in_k, other=0.0).to(tl.float32)
    mag = tl.abs(x)
    if HAS_SCALE:
        mag = mag * tl.load(s_ptr + offs_k, mask=in_k, other=0.0)
    active = (mag >= threshold) & in_k
    if tl.sum(active.to(tl.int32), axis=0) == 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < n_out
    w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                mask=active[:, None] & in_n[None, :], other=0.0).to(tl.float32)
    xs = tl.where(active, x, 0.0)
    part = tl.sum(xs[:, None] * w, axis=0)
    tl.atomic_add(y_ptr + t * stride_yt + offs_n, part, mask=in_n)


def sparse_linear_triton(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                         threshold: float, block_k: int = 64, block_n: int = 128,
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel; x is [..., in], weight_t [in, out], scale fp32 [in] or None;
    returns [..., out] in x's dtype."""
    n_in, n_out = weight_t.shape
    x2 = x.reshape(-1, n_in).contiguous()
    w = weight_t.contiguous()
    y = torch.zeros(x2.shape[0], n_out, device=x.device, dtype=torch.float32)
    if x2.shape[0]:
        grid = (triton.cdiv(n_out, block_n), triton.cdiv(n_in, block_k), x2.shape[0])
        s = scale.float().contiguous() if scale is not None else y
        _sparse_gemv_kernel[grid](x2, w, y, s, float(threshold), n_in, n_out,
                                  x2.stride(0), w.stride(0), y.stride(0),
                                  BLOCK_K=block_k, BLOCK_N=block_n,
                                  HAS_SCALE=scale is not None)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
