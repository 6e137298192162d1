"""Triton kernels of token_merge and token_unmerge for CUDA. Tested on CPU under
TRITON_INTERPRET=1.

- merge, grid (rows * tokens, column blocks): each program adds its token's
  size-weighted columns into the fp32 accumulator row of its slot (atomic adds),
  and the first column block adds the size; torch then divides;
- unmerge, grid (rows * tokens, column blocks): copies the group's row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _merge_kernel(x_ptr, size_ptr, slot_ptr, acc_ptr, total_ptr, tokens, n_out, width,
                  stride_x0, stride_x1, stride_x2, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    cb = tl.program_id(1)
    i = e // tokens
    t = e % tokens
    s = tl.load(slot_ptr + e)
    w = tl.load(size_ptr + e)
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    x = tl.load(x_ptr + i * stride_x0 + t * stride_x1 + cols * stride_x2, mask=keep,
                other=0.0).to(tl.float32)
    tl.atomic_add(acc_ptr + (i * n_out + s) * width + cols, x * w, mask=keep)
    if cb == 0:
        tl.atomic_add(total_ptr + i * n_out + s, w)


@triton.jit
def _unmerge_kernel(x_ptr, index_ptr, y_ptr, tokens, n, width, stride_x0, stride_x1,
                    stride_x2, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    cb = tl.program_id(1)
    i = e // tokens
    src = tl.load(index_ptr + e)
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    v = tl.load(x_ptr + i * stride_x0 + src * stride_x1 + cols * stride_x2, mask=keep)
    tl.store(y_ptr + e * width + cols, v, mask=keep)


def token_merge(x: torch.Tensor, size: torch.Tensor, slot: torch.Tensor,
                n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``reference.merge_reference``, on CUDA tensors."""
    rows, tokens, width = x.shape
    acc = torch.zeros(rows, n_out, width, dtype=torch.float32, device=x.device)
    total = torch.zeros(rows, n_out, dtype=torch.float32, device=x.device)
    if rows * tokens and width:
        grid = (rows * tokens, triton.cdiv(width, BLOCK))
        _merge_kernel[grid](x, size.float().contiguous(), slot.contiguous(), acc, total,
                            tokens, n_out, width, *x.stride(), BLOCK=BLOCK)
    return (acc / total.clamp_min(1e-30)[..., None]).to(x.dtype), total


def token_unmerge(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """As ``reference.unmerge_reference``, on CUDA tensors."""
    rows, n, width = x.shape
    tokens = index.shape[1]
    y = torch.empty(rows, tokens, width, dtype=x.dtype, device=x.device)
    if rows * tokens and width:
        grid = (rows * tokens, triton.cdiv(width, BLOCK))
        _unmerge_kernel[grid](x, index.contiguous(), y, tokens, n, width, *x.stride(),
                              BLOCK=BLOCK)
    return y
