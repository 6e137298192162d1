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
