"""Plain-torch semantics of sparse_linear: the oracle every kernel is tested against.

    y = (x * (|x| * scale >= threshold)) @ weight_t + bias

``scale`` (one per input channel, default all ones) ranks channels by more than their
magnitude: the norm of the weight row a channel feeds makes it |x_i| * ||W[:, i]||
(WINA's criterion).

``weight_t`` is the weight in input-major layout ([in, out], the transpose of
nn.Linear's [out, in]), so an active input channel is one contiguous row.
A threshold of 0 keeps every channel: the dense linear.
"""

from __future__ import annotations

import torch


def sparse_linear_reference(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                            threshold: torch.Tensor | float,
                            scale: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if isinstance(threshold, torch.Tensor) and threshold.numel() == rows and rows > 1:
        # one threshold per token (row of x flattened to 2-D)
        thr = threshold.to(device=x.device, dtype=torch.float32).reshape(*x.shape[:-1], 1)
        kept = x * (score(x, scale) >= thr)
    else:
        thr = float(threshold)
        kept = x * (score(x, scale) >= thr) if thr > 0 else x
    y = kept.to(torch.float32) @ weight_t.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def score(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What the threshold is compared with: ``|x|``, times ``scale`` per channel if given,
    in fp32 (as the kernels compare: a half-precision comparison would round the
    threshold)."""
    a = x.abs().float()
    return a if scale is None else a * scale


def active_rows(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of input channels that some token keeps (the union over tokens)."""
    x2 = x.reshape(-1, x.shape[-1])
    if threshold <= 0:
        return torch.arange(x2.shape[1], device=x.device)
    return (x2.abs() >= threshold).any(0).nonzero().flatten()
