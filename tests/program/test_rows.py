"""Rows leaving a batch: selected values keep their layout; the batch size follows."""

import torch
from torch import fx

from dyncompile.program.rows import row_major, select_rows, take_rows


def test_select_rows_keeps_the_stride_order():
    v = torch.randn(6, 5, 4).permute(0, 2, 1)          # not contiguous: dims 1 and 2 swapped
    idx = torch.tensor([4, 1, 5])
    out = select_rows(v, idx)
    torch.testing.assert_close(out, v.index_select(0, idx))
    order = sorted(range(3), key=lambda d: -v.stride(d))
    assert sorted(range(3), key=lambda d: -out.stride(d)) == order
    c = torch.randn(6, 7)
    assert row_major(select_rows(c, idx)) and select_rows(c, idx).shape == (3, 7)


def test_take_rows_selects_batch_values_and_counts_rows():
    g = fx.Graph()
    a, n, w = g.placeholder("a"), g.placeholder("n"), g.placeholder("w")
    weight = torch.randn(3, 3)
    env = {a: torch.arange(12.0).reshape(4, 3), n: 4, w: weight}
    out = take_rows(env, batch={a}, batch_ints={n}, idx=torch.tensor([3, 0]))
    torch.testing.assert_close(out[a], torch.tensor([[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]]))
    assert out[n] == 2 and out[w] is weight
