"""The quality loss per row the planner measures."""

import torch

from dyncompile.plan.quality import primary, row_losses


def test_hidden_states_lose_one_minus_cosine_per_position_and_padding_is_left_out():
    dense = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    approx = dense.clone()
    approx[1, 4] = -approx[1, 4]                      # one position reversed: cosine -1
    losses = row_losses(dense, approx)
    assert losses.tolist() == [0.0, 1.0 / 5, 0.0]     # clipped to 1, averaged over 5
    mask = torch.ones(3, 5)
    mask[1, 4] = 0                                    # that position is padding
    assert row_losses(dense, approx, mask).tolist() == [0.0, 0.0, 0.0]


def test_logits_lose_the_share_of_changed_top1_and_outputs_are_found_by_name():
    logits = torch.tensor([[[2.0, 1.0], [0.0, 3.0]], [[1.0, 0.0], [1.0, 0.0]]])
    flipped = logits.clone()
    flipped[0, 0] = torch.tensor([0.0, 5.0])
    out = {"hidden": torch.zeros(2, 2, 4), "logits": flipped}
    assert primary(out)[0] == "logits"
    assert row_losses({"logits": logits}, out).tolist() == [0.5, 0.0]


def test_quality_override_reads_a_bare_tensor_as_logits_or_logits_as_vectors():
    import pytest

    from dyncompile.plan.quality import validate_quality

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    scaled = logits * 2                                    # same top-1, same direction
    flipped = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])  # row 0's top-1 changes
    assert row_losses(logits, flipped, quality="top1").tolist() == [1.0, 0.0]
    auto = row_losses(logits, flipped)                    # a bare tensor: cosine by default
    assert 0.0 < auto[0] < 1.0 and auto[1] == 0.0
    assert row_losses({"logits": logits}, {"logits": scaled}, quality="cosine").abs().max() \
        < 1e-12
    got = row_losses(logits, flipped, quality=lambda d, a: (d - a).abs().amax(-1) / 10)
    assert got.tolist() == pytest.approx([0.1, 0.0])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        row_losses(logits, flipped, quality=lambda d, a: 3 * (d - a).abs().amax(-1))
    with pytest.raises(ValueError, match="quality must be one of"):
        validate_quality("kl")
