"""Triton kernels for CUDA: grouped (token, expert) GEMMs over contiguous expert slices.

The selected pairs are grouped by expert in torch (``mask.t().nonzero()``:
expert-major, so each expert's tokens are one contiguous run) and cut into
tiles of ``BLOCK_M`` pairs of one expert; experts no token picks get no tile.

- kernel 1, grid (tiles, hidden blocks): gathers the tile's token rows,
  multiplies them by the expert's up (and gate) rows ``w_up[lo:hi]`` with
  ``tl.dot`` in fp32, adds the biases, applies the activation (and the GLU
  product) and writes the hidden of each pair to a [pairs, max width] buffer;
- kernel 2, grid (tiles, output blocks): multiplies the tile's hidden by the
  expert's down rows ``w_down_t[lo:hi]`` and atomically adds the result into
  an fp32 output that starts at ``b_down``.

Any strides are accepted (no weight copies); fp32 inputs use IEEE fp32 dots,
fp16/bf16 inputs their native dots, all accumulating in fp32. Tested on CPU
under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ACTIVATIONS, check_activation, expert_widths


@triton.jit
def _activation(v, ACT: tl.constexpr):
    # Codes follow reference.ACTIVATIONS.
    if ACT == 0:
        out = tl.maximum(v, 0.0)
    elif ACT == 1:
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:  # 0.5 v (1 + tanh(z)) == v sigmoid(2 z)
        out = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    elif ACT == 3:
        out = v * tl.sigmoid(v)
    elif ACT == 4:
        out = tl.sigmoid(v)
    elif ACT == 5:  # tanh(v) == 2 sigmoid(2 v) - 1
        out = 2.0 * tl.sigmoid(2.0 * v) - 1.0
    else:
        out = v
    return out


@triton.jit
def _up_kernel(x_ptr, wu_ptr, bu_ptr, wg_ptr, bg_ptr, h_ptr,
               tok_ptr, tile_exp_ptr, tile_start_ptr, exp_end_ptr,
               n_d, hidden, n_exp,
               stride_xt, stride_xd, stride_wu0, stride_wu1, stride_wg0, stride_wg1, stride_h,
               HAS_BU: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BG: tl.constexpr,
               ACT: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tl.program_id(0)
    pid_h = tl.program_id(1)
    e = tl.load(tile_exp_ptr + tile)
    lo = e * hidden // n_exp
    width = (e + 1) * hidden // n_exp - lo
    if pid_h * BLOCK_H >= width:
        return
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(exp_end_ptr + e)
    rows = start + tl.arange(0, BLOCK_M)
    in_m = rows < end
    tok = tl.load(tok_ptr + rows, mask=in_m, other=0)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < width
    units = lo + offs_h
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, n_d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < n_d
        xb = tl.load(x_ptr + tok[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                     mask=in_m[:, None] & in_d[None, :], other=0.0)
        wb = tl.load(wu_ptr + units[None, :] * stride_wu0 + offs_d[:, None] * stride_wu1,
                     mask=in_d[:, None] & in_h[None, :], other=0.0)
        acc = tl.dot(xb, wb, acc, input_precision=PRECISION)
        if HAS_GATE:
            gb = tl.load(wg_ptr + units[None, :] * stride_wg0 + offs_d[:, None] * stride_wg1,
                         mask=in_d[:, None] & in_h[None, :], other=0.0)
            acc_g = tl.dot(xb, gb, acc_g, input_precision=PRECISION)
    if HAS_BU:
        acc += tl.load(bu_ptr + units, mask=in_h, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + units, mask=in_h, other=0.0).to(tl.float32)[None, :]
        h = _activation(acc_g, ACT) * acc
    else:
        h = _activation(acc, ACT)
    tl.store(h_ptr + rows[:, None] * stride_h + offs_h[None, :], h,
             mask=in_m[:, None] & in_h[None, :])


@triton.jit
def _down_kernel(h_ptr, wd_ptr, y_ptr, tok_ptr, tile_exp_ptr, tile_start_ptr, exp_end_ptr,
                 hidden, n_exp, n_out, stride_h, stride_wd0, stride_wd1, stride_yt,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_exp_ptr + tile)
    lo = e * hidden // n_exp
    width = (e + 1) * hidden // n_exp - lo
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(exp_end_ptr + e)
    rows = start + tl.arange(0, BLOCK_M)
    in_m = rows < end
    tok = tl.load(tok_ptr + rows, mask=in_m, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < width
        wb = tl.load(wd_ptr + (lo + offs_k)[:, None] * stride_wd0 + offs_n[None, :] * stride_wd1,
                     mask=in_k[:, None] & in_n[None, :], other=0.0)
        hb = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                     mask=in_m[:, None] & in_k[None, :], other=0.0)
        acc = tl.dot(hb.to(wb.dtype), wb, acc, input_precision=PRECISION)
    # Tokens within a tile are distinct; different experts meet in the atomics.
    tl.atomic_add(y_ptr + tok[:, None] * stride_yt + offs_n[None, :], acc,
                  mask=in_m[:, None] & in_n[None, :])


def expert_tiles(mask: torch.Tensor, hidden: int,
                 block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens of the pairs grouped by expert, tile expert, tile first pair, expert end pair).

    Experts with no token (or no hidden unit) get no tile. Syncs once (the pair count).
    """
    n_exp = mask.shape[1]
    dev = mask.device
    tokens = mask.t().nonzero()[:, 1].contiguous()
    counts = mask.sum(0)
    ends = counts.cumsum(0)
    widths = torch.tensor(expert_widths(hidden, n_exp), device=dev)
    n_tiles = torch.where(widths > 0, (counts + block_m - 1) // block_m, 0)
    tile_exp = torch.repeat_interleave(torch.arange(n_exp, device=dev), n_tiles)
    first_tile = n_tiles.cumsum(0) - n_tiles
    tile_start = (ends - counts)[tile_exp] + (
        torch.arange(tile_exp.shape[0], device=dev) - first_tile[tile_exp]) * block_m
    return tokens, tile_exp.contiguous(), tile_start.contiguous(), ends.contiguous()


def expert_ffn_triton(x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
                      w_gate: torch.Tensor | None, b_gate: torch.Tensor | None,
                      w_down_t: torch.Tensor, b_down: torch.Tensor | None, mask: torch.Tensor,
                      activation: str, block_m: int = 16, block_h: int = 64, block_d: int = 64,
                      block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """Launch both kernels; x [..., D], mask [N, E]; returns [..., D_out] in x's dtype."""
    act = ACTIVATIONS.index(check_activation(activation))
    hidden, n_d = w_up.shape
    n_out = w_down_t.shape[1]
    n_exp = mask.shape[1]
    dt = w_up.dtype  # x follows the weights (never copy a weight to match x)
    x2 = x.reshape(-1, n_d).to(dt)
    w_gate = w_gate.to(dt) if w_gate is not None else None
    w_down_t = w_down_t.to(dt)
    precision = "ieee" if dt == torch.float32 else None  # None: the default for 16-bit
    y = torch.zeros(x2.shape[0], n_out, device=x.device, dtype=torch.float32)
    if b_down is not None:
        y += b_down.float()
    tokens, tile_exp, tile_start, ends = expert_tiles(mask.to(torch.bool), hidden, block_m)
    n_tiles = tile_exp.shape[0]
    if n_tiles:
        w_max = -(-hidden // n_exp)
        h = torch.empty(tokens.shape[0], w_max, device=x.device, dtype=torch.float32)
        wg = w_gate if w_gate is not None else w_up
        _up_kernel[(n_tiles, triton.cdiv(w_max, block_h))](
            x2, w_up, b_up if b_up is not None else w_up, wg,
            b_gate if b_gate is not None else w_up, h, tokens, tile_exp, tile_start, ends,
            n_d, hidden, n_exp, x2.stride(0), x2.stride(1), w_up.stride(0), w_up.stride(1),
            wg.stride(0), wg.stride(1), h.stride(0),
            HAS_BU=b_up is not None, HAS_GATE=w_gate is not None, HAS_BG=b_gate is not None,
            ACT=act, PRECISION=precision, BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_D=block_d)
        _down_kernel[(n_tiles, triton.cdiv(n_out, block_n))](
            h, w_down_t, y, tokens, tile_exp, tile_start, ends, hidden, n_exp, n_out,
            h.stride(0), w_down_t.stride(0), w_down_t.stride(1), y.stride(0),
            PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
