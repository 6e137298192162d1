"""CPU fast path of the router: scores and dynamic-k selection in as few passes as possible.

``route_mask`` computes ``select(router_scores(fc1, fc2, x, bf16), tau)``
(``dyncompile.forms.expert.fit.select``). ``route_tokens`` (C++) runs the whole router in
one pass over the tokens: the first layer from packed weights in register tiles
of four tokens by 64 hidden units with AVX-512, 16 elsewhere (with ``bf16``, the
operands rounded to bf16 and AVX512-BF16 dot products, fp32 accumulation: on a CPU
with native bf16 dot
products about twice as fast as fp32), its bias and ReLU, the second layer
(``hidden -> experts``, too narrow for BLAS to run well: four tokens at a time
against the transposed weights, no horizontal sums), its ReLU, the row max and
the threshold ``score >= tau * max``. No library matmul, so no parallel region
for a few hundred tokens (a region costs more than the layer there). Measured
against the route it replaced (library matmul, then ``route_select``) at 128 to
4096 tokens: bf16 2.3x (128) to 1.4x (4096) faster, fp32 as fast or faster.
The tiles are written with ATen's vector class (``ops/vec.h``), so the same source
builds for AVX-512, AVX2, NEON and SVE; without native bf16 dot products the bf16
router runs the fp32 tiles on bf16-rounded weights and tokens (the same products).
The scores agree with ``router_scores`` to float rounding (the summation order
differs), so a token whose score sits within rounding of its threshold may select differently.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cpp_extension import InlineExtension

_EXT = InlineExtension("dyncompile_expert_route_v6", Path(__file__).with_name("expert_route.cpp"),
                       ["route_select", "route_tokens", "first_layer_kinds"],
                       ("-O3", "-march=native", "-fopenmp"))


def kernel_available() -> bool:
    return _EXT.load() is not None


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (a bf16 matmul is then about twice
    as fast as fp32; elsewhere it is emulated and slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


# Per router: (its parameters and their versions, the first layer with bf16-rounded
# weights, the padded transposed second layer and bias, the first layer packed for
# ``route_tokens`` in fp32, in bf16 pairs and in fp32 rounded to bf16), so a call
# never converts a weight.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared(fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
    params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    versions = tuple(-1 if p is None else int(p._version) for p in params)
    got = _PREPARED.get(fc2)
    if got is None or got[1] != versions or any(a is not b for a, b in zip(got[0], params)):
        e, k = fc2.weight.shape
        ep = -(-e // 16) * 16
        w2t = torch.zeros(k, ep)
        w2t[:, :e] = fc2.weight.detach().t()
        b2 = torch.zeros(ep)
        if fc2.bias is not None:
            b2[:e] = fc2.bias.detach()
        w1 = fc1.weight.detach().float()
        d = w1.shape[1]
        kp = -(-k // 64) * 64
        p32 = torch.zeros(d, kp)
        p32[:, :k] = w1.t()
        p16 = torch.zeros(kp, 2 * (-(-d // 2)))
        p16[:k, :d] = w1
        p16 = p16.to(torch.bfloat16).reshape(kp, -1, 2).transpose(0, 1).contiguous()
        got = (params, versions, w1.to(torch.bfloat16).float(), w2t, b2, p32, p16,
               p32.to(torch.bfloat16).float())
        _PREPARED[fc2] = got
    return got[2:]


@functools.cache
def _first_layer_kinds() -> tuple[bool, bool]:
    """(fp32, bf16): whether ``route_tokens`` runs that router in one pass (both, where
    the kernel is built)."""
    return (True, True) if _EXT.load() is not None else (False, False)


@functools.cache
def native_bf16_layer() -> bool:
    """Whether the built kernel's bf16 first layer uses native bf16 dot products (else
    fp32 tiles on bf16-rounded operands)."""
    mod = _EXT.load()
    return bool(mod.first_layer_kinds()[1]) if mod is not None else False


def kernel_isa() -> str | None:
    """The vector class the built kernel uses ("avx512", "avx2", "neon", "default")."""
    mod = _EXT.load()
    return str(mod.first_layer_kinds()[2]) if mod is not None else None


def _first_layer(prepared: tuple[torch.Tensor, ...], bf16: bool) -> tuple[torch.Tensor, bool]:
    """(packed first layer, round the tokens to bf16) for ``route_tokens``."""
    p32, p16, p32b = prepared[3:]
    if not bf16:
        return p32, False
    return (p16, False) if native_bf16_layer() else (p32b, True)


def router_scores(fc1: torch.nn.Linear, fc2: torch.nn.Linear, x: torch.Tensor,
                  bf16: bool) -> torch.Tensor:
    """``relu(fc2(relu(fc1(x))))`` as the fast path computes it: with ``bf16``, the first
    layer's operands are rounded to bf16 (products exact, sums, bias and everything
    after in fp32)."""
    if not bf16:
        return torch.relu(fc2(torch.relu(fc1(x))))
    w1 = _prepared(fc1, fc2)[0]
    h = F.linear(x.to(torch.bfloat16).to(x.dtype), w1.to(x.dtype), fc1.bias)
    return torch.relu(fc2(torch.relu(h)))


# Tokens per thread's share in ``route_tokens`` (fewer run on the calling thread alone).
ROUTE_TOKENS_GRAIN = 256


def route_mask(fc1: torch.nn.Linear, fc2: torch.nn.Linear, x: torch.Tensor,
               tau: float, bf16: bool = False) -> torch.Tensor | None:
    """Bool mask [N, E] of ``select(router_scores(fc1, fc2, x, bf16), tau)``, or None where
    the fast path does not apply (not fp32 on CPU, or no C++ kernel)."""
    mod = _EXT.load()
    if mod is None or x.device.type != "cpu" or x.dtype != torch.float32 \
            or fc1.weight.dtype != torch.float32 or fc1.bias is None or fc2.bias is None:
        return None
    prepared = _prepared(fc1, fc2)
    w1, w2t, b2 = prepared[:3]
    e, b1 = int(fc2.weight.shape[0]), fc1.bias.detach()
    if _first_layer_kinds()[int(bf16)]:
        w1p, rnd = _first_layer(prepared, bf16)
        return mod.route_tokens(x, w1p, b1, w2t, b2, e, float(tau), ROUTE_TOKENS_GRAIN, rnd)
    h = F.linear(x.to(torch.bfloat16).float(), w1) if bf16 else F.linear(x, fc1.weight)
    return mod.route_select(h, b1, w2t, b2, e, float(tau))


def route_lane(fc1: torch.nn.Linear, fc2: torch.nn.Linear,
               bf16: bool) -> Callable[[torch.Tensor, float], torch.Tensor] | None:
    """``lane(x, tau)``: ``route_mask(fc1, fc2, x, tau, bf16)`` for fp32 CPU ``x``, with the
    router's prepared weights bound once (the least Python per call), or None where the
    one-pass C++ router does not apply. Bound to the weights as they are now: take a new
    lane after the router changes."""
    mod = _EXT.load()
    if mod is None or fc1.weight.dtype != torch.float32 or fc1.weight.device.type != "cpu" \
            or fc1.bias is None or fc2.bias is None or not _first_layer_kinds()[int(bf16)]:
        return None
    prepared = _prepared(fc1, fc2)
    _, w2t, b2 = prepared[:3]
    fn = mod.route_tokens
    (w1p, rnd), b1 = _first_layer(prepared, bf16), fc1.bias.detach()
    e, grain = int(fc2.weight.shape[0]), ROUTE_TOKENS_GRAIN

    def lane(x: torch.Tensor, tau: float) -> torch.Tensor:
        return fn(x, w1p, b1, w2t, b2, e, tau, grain, rnd)

    return lane
