"""Quality loss per row: how far an adaptive model's output is from the dense one.

The output compared is the model's ``logits`` when it has them, else its first
tensor (a hidden state, an embedding). Each row (dim 0) gets a loss in [0, 1]:

- logits: the share of positions whose top-1 class differs from the dense one;
- anything else: ``1 - cosine`` of each position's vector with the dense one,
  averaged over the row's positions (clipped to [0, 1]).

``optimize(..., quality=...)`` overrides the choice: ``"top1"`` reads the output
as logits (a model that returns a bare logits tensor), ``"cosine"`` compares
vectors even for logits, and a callable ``fn(dense_output, output) -> tensor of
per-row losses in [0, 1]`` measures anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

#: Named quality measures ("auto": top-1 for ``logits`` outputs, else cosine).
QUALITIES = ("auto", "cosine", "top1")
Quality = str | Callable[[Any, Any], torch.Tensor]


def validate_quality(quality: Any) -> Quality:
    """``quality`` as given, or ValueError naming what is accepted."""
    if callable(quality) or quality in QUALITIES:
        return quality
    raise ValueError(f"quality must be one of {', '.join(map(repr, QUALITIES))} or a "
                     f"callable (dense_output, output) -> per-row losses, got {quality!r}")


def primary(out: Any) -> tuple[str, torch.Tensor] | None:
    """(kind, tensor) of the output the quality is measured on: ("logits", t) or
    ("hidden", t); None when the output holds no floating tensor."""
    if isinstance(out, torch.Tensor):
        return ("hidden", out) if out.is_floating_point() else None
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        try:
            items = list(out.items())
        except Exception:  # noqa: BLE001
            items = []
        for k, v in items:
            if k == "logits" and isinstance(v, torch.Tensor):
                return "logits", v
        for _, v in items:
            got = primary(v)
            if got is not None:
                return got
        return None
    if isinstance(out, (tuple, list)):
        for v in out:
            got = primary(v)
            if got is not None:
                return got
    return None


def row_losses(dense: Any, approx: Any, mask: torch.Tensor | None = None,
               quality: Quality = "auto") -> torch.Tensor:
    """Loss in [0, 1] of each row of ``approx`` against ``dense`` (float64, on the CPU);
    ``mask`` ([rows, positions], e.g. the attention mask) leaves padding out."""
    if callable(quality):
        got = torch.as_tensor(quality(dense, approx)).detach().double().cpu().flatten()
        if got.numel() and (bool(got.isnan().any()) or got.min() < 0 or got.max() > 1):
            raise ValueError("dyncompile: the quality callable must return per-row losses "
                             f"in [0, 1], got values in [{float(got.min())}, "
                             f"{float(got.max())}]")
        return got
    d, a = primary(dense), primary(approx)
    if d is None or a is None:
        raise ValueError("dyncompile: the model's output holds no floating tensor to "
                         "measure quality on (planning needs logits or hidden states)")
    kind, dt = d
    at = a[1]
    if quality != "auto":
        kind = "logits" if quality == "top1" else "hidden"
    if dt.shape != at.shape:
        raise ValueError(f"dyncompile: output shape {tuple(at.shape)} differs from the "
                         f"dense model's {tuple(dt.shape)}")
    dt, at = dt.detach().double().cpu(), at.detach().double().cpu()
    if dt.dim() == 0:
        dt, at = dt.view(1, 1), at.view(1, 1)
    elif dt.dim() == 1:
        dt, at = dt.view(1, -1), at.view(1, -1)
    rows = dt.shape[0]
    if kind == "logits":
        per = 1.0 - (dt.argmax(-1) == at.argmax(-1)).double().reshape(rows, -1)
    else:
        dv = dt.reshape(rows, -1, dt.shape[-1])
        av = at.reshape(rows, -1, at.shape[-1])
        cos = torch.nn.functional.cosine_similarity(dv, av, dim=-1, eps=1e-12)
        same = (dv == av).all(-1)  # zero vectors equal in both: no loss
        per = (1.0 - torch.where(same, torch.ones_like(cos), cos)).clamp(0.0, 1.0)
    if mask is not None and tuple(mask.shape) == tuple(per.shape):
        w = mask.detach().double().cpu()
        return (per * w).sum(1) / w.sum(1).clamp_min(1.0)
    return per.mean(1)
