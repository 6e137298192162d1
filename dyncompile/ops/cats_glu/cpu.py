"""CPU kernel of cats_glu: only the hidden channels some token keeps are touched.

In the decode regime (few tokens, a sparse union of kept channels) a C++
kernel walks the union once: for each kept channel j it computes
``u[t, j] = x[t] . w_up[j]`` for the tokens that keep j, then adds
``a[t, j] * u[t, j] * w_down_t[j]`` into the token's output (private
accumulators per thread, torch's thread pool). Both weight rows are
contiguous. Otherwise two dense GEMMs on the masked activations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cpp_extension import InlineExtension

_EXT = InlineExtension("dyncompile_cats_glu_v2", Path(__file__).with_name("cats_glu.cpp"),
                       ["cats_glu_fwd"], ("-O3", "-march=native", "-ffast-math"))



def _contiguous_or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return t.contiguous().float() if t is not None else torch.empty(0)


def cats_glu_cpu(a: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None,
                 w_down_t: torch.Tensor, b_down: torch.Tensor | None, threshold: float,
                 max_tokens: int, max_active: float) -> tuple[torch.Tensor, int, int, bool]:
    """(y [N, D_out], union of kept channels, kept pairs, sparse path taken?) for 2-D a and x."""
    mod = _EXT.load()
    if mod is not None and all(t.dtype == torch.float32 for t in (a, x, w_up, w_down_t)):
        y, k, pairs, sparse = mod.cats_glu_fwd(a, x, w_up, _contiguous_or_empty(b_up), w_down_t,
                                               _contiguous_or_empty(b_down), threshold,
                                               max_tokens, max_active)
        return y, int(k), int(pairs), bool(sparse)
    from .reference import cats_glu_reference

    mask = a.abs() >= threshold
    y = cats_glu_reference(a, x, w_up, b_up, w_down_t, b_down, threshold)
    return y, int(mask.any(0).sum()), int(mask.sum()), False


def kernel_available() -> bool:
    return _EXT.available()
