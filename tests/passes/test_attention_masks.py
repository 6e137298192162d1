"""hoist_mask_conversions: every attention call reads one additive mask made once,
and the graph computes the same outputs."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from dyncompile.passes.attention_masks import hoist_mask_conversions
from dyncompile.passes.graph_utils import tensor_value
from tests.conftest import capture_graphs

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_hidden_layers=3, vocab_size=99, max_position_embeddings=64)


def _sdpa_masks(gm):
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            m = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
            out.append(m)
    return out


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.parametrize("padded", [False, True])
def test_bool_masks_become_one_additive_mask_with_equal_outputs(padded):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    ids = torch.randint(1, 99, (3, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 4:] = 0
    x = {"input_ids": ids, "attention_mask": mask}

    def rewrite(gm, example):
        before = [tensor_value(m).dtype for m in _sdpa_masks(gm)]
        want = gm(*example)
        fills = _count(gm, torch.masked_fill)
        n = hoist_mask_conversions(gm)
        after = _sdpa_masks(gm)
        got = gm(*example)
        return before, n, after, fills, _count(gm, torch.masked_fill), want, got

    before, n, after, fills0, fills1, want, got = capture_graphs(model, x, rewrite)[0]
    assert before == [torch.bool] * SMALL["num_hidden_layers"]
    assert n == SMALL["num_hidden_layers"]
    # One conversion node, read by every layer's attention, in the query's dtype.
    assert len(set(after)) == 1 and tensor_value(after[0]).dtype == torch.float32
    assert fills1 == fills0 + 1
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_graphs_without_boolean_masks_are_left_alone():
    class NoMask(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    def rewrite(gm, example):
        code = gm.code
        return hoist_mask_conversions(gm), gm.code == code

    assert capture_graphs(NoMask(), torch.randn(1, 2, 5, 4), rewrite)[0] == (0, True)
