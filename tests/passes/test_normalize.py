"""Fused attention calls are expanded into plain ops with identical outputs."""

import pytest
import torch
import torch.nn.functional as F

from dyncompile.passes.manager import op_counts
from dyncompile.passes.normalize import expand_fused_attention
from dyncompile.testing.zoo import ZOO
from tests.conftest import capture_graphs


def _fused(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and (
        n.target is F.multi_head_attention_forward
        or n.target is getattr(torch, "_transformer_encoder_layer_fwd", None)
        or n.target is getattr(torch, "_native_multi_head_attention", None)))


@pytest.mark.parametrize("name", ["encoder-layer", "encoder-layer-bf", "encoder-layer-nf",
                                  "encoder-layer-bf-nf", "prenorm"])
def test_expansion_keeps_outputs(name):
    entry = ZOO[name]

    def check(gm, example_inputs):
        before = _fused(gm)
        ref = gm(*example_inputs)
        n = expand_fused_attention(gm)
        after_counts = op_counts(gm)
        out = gm(*example_inputs)
        return before, n, _fused(gm), after_counts, ref, out

    ((before, n, after, counts, ref, out),) = capture_graphs(entry.build(), entry.inputs(2, 5),
                                                             check)
    assert before >= 1 and n == before and after == 0
    assert counts["sdpa"] == before and counts["linear"] >= 2 * before
    for r, o in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple)
                    else (out,)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_mha_with_key_padding_mask():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, mask):
            return self.mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]

    def check(gm, ex):
        ref = gm(*ex)
        n = expand_fused_attention(gm)
        return n, ref, gm(*ex)

    with torch.enable_grad():  # keeps nn.MultiheadAttention off its fused fast path
        ((n, ref, out),) = capture_graphs(M(), (x, mask), check)
    assert n == 1
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out,
                               ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)
