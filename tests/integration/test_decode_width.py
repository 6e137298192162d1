"""Decoding through Hugging Face ``generate()`` on the Llama shape of the width benchmark
(``dyncompile.testing.llama_shapes``, its small-layer-count version): greedy tokens at budget
1.0 equal dense, the rewrite covers every projection, compute falls at 0.5, in fp32 and
in half precision."""

import copy

import pytest
import torch

import dyncompile
from dyncompile.testing.llama_shapes import SHAPES, build, random_prompts, resident_bytes


def _generate(model, ids, new=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_generate_equals_dense_at_1_and_spends_less_at_half(dtype):
    base = build("tiny", dtype, vocab=512)
    before = copy.deepcopy(base.state_dict())
    opt = dyncompile.optimize(base, methods=["gated"], calibration=random_prompts(512),
                              plan=False)
    # every attention and FFN projection is a gated site: q, k, v, o, gate, up, down
    layers = SHAPES["tiny"]["num_hidden_layers"]
    assert len(opt.state.forms["gated"].tables) == 7 * layers
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    dense = _generate(base, ids)
    with dyncompile.budget(1.0):
        assert torch.equal(_generate(opt, ids), dense)
    with dyncompile.budget(0.5):
        _generate(opt, ids)
    # the last call is one decode step: about half of every rewritten linear skipped
    assert opt.stats.fraction < 0.9
    assert 0.3 < opt.stats.ratio("active_channels") < 0.7
    # optimize() left the caller's model as it was, and the copy holds no second weight
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert resident_bytes(opt.model) == resident_bytes(base)
