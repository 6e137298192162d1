"""Plain-torch reference of ``token_mean``."""

from __future__ import annotations

import torch


def token_mean_reference(x: torch.Tensor) -> torch.Tensor:
    """``x.float().mean(1)`` for ``x`` [rows, tokens, width]: [rows, width] in float32."""
    return x.float().mean(1)
