"""token_merge: matching never joins different groups, keeps the first token and the
order; the C++ kernels (both builds) and the Triton kernels (interpreter) equal the
references on odd shapes and dtypes; fake kernels; opcheck."""

import pytest
import torch

from dyncompile.ops.token_merge import cpu
from dyncompile.ops.token_merge import op as _op  # noqa: F401  (registers the ops)
from dyncompile.ops.token_merge.reference import (
    assign_reference,
    merge_reference,
    unmerge_reference,
)
from tests.ops.conftest import assert_runs_interpreted

ops = torch.ops.dyncompile
needs_kernel = pytest.mark.skipif(not cpu.kernel_available(), reason="no C++ compiler")
SHAPES = [(1, 1, 1), (1, 2, 5), (3, 11, 37), (2, 128, 384), (5, 17, 130), (4, 33, 257)]


def _plan(x, group, r, protect=True):
    best, partner = ops.token_match(x, group, protect)
    return ops.token_assign(best, partner, r, x.shape[1])


def test_the_cpu_kernels_are_registered():
    if not cpu.kernel_available():
        pytest.skip("no C++ compiler")
    for name in ("token_merge", "token_unmerge"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dyncompile::{name}", "CPU")


@pytest.mark.parametrize("tokens", [2, 3, 10, 31, 128])
def test_match_keeps_groups_apart_first_token_and_order(tokens):
    torch.manual_seed(tokens)
    rows = 3
    x = torch.randn(rows, tokens, 16)
    group = torch.zeros(rows, tokens, dtype=torch.long)
    group[1, tokens // 2:] = 1  # padding from the middle on
    group[2, 1::3] = 2
    best, partner = ops.token_match(x, group, True)
    na = (tokens + 1) // 2
    assert best.shape == partner.shape == (rows, na)
    assert torch.isinf(best[:, 0]).all()  # token 0 never merges
    r = int((best > float("-inf")).sum(1).min())
    slot, rep = ops.token_assign(best, partner, r, tokens)
    assert slot.shape == (rows, tokens) and rep.shape == (rows, tokens - r)
    for i in range(rows):
        # every token goes to the slot of a kept token of its own group
        assert (group[i, rep[i, slot[i]]] == group[i]).all()
        assert slot[i, 0] == 0 and rep[i, 0] == 0
        assert (rep[i].diff() > 0).all()  # kept tokens in their original order
        assert (slot[i, rep[i]] == torch.arange(tokens - r)).all()
        merged = torch.bincount(slot[i], minlength=tokens - r)
        assert int((merged - 1).sum()) == r and merged.max() <= na + 1


def test_match_takes_the_most_similar_pairs():
    # tokens 2 and 3 are identical, token 4 is far from everything: one merge joins 2 -> 3
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.1]]])
    slot, rep = _plan(x, torch.zeros(1, 5, dtype=torch.long), 1)
    assert slot.tolist() == [[0, 1, 2, 2, 3]] and rep.tolist() == [[0, 1, 3, 4]]


def test_assign_zero_merges_is_the_identity_and_too_many_is_an_error():
    x = torch.randn(2, 9, 4)
    g = torch.zeros(2, 9, dtype=torch.long)
    slot, rep = _plan(x, g, 0)
    assert (slot == torch.arange(9)).all() and (rep == torch.arange(9)).all()
    best, partner = ops.token_match(x, g, False)
    with pytest.raises(ValueError, match="candidate tokens"):
        assign_reference(best, partner, 6, 9)


def _sizes(rows, tokens):
    return torch.randint(1, 4, (rows, tokens)).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_and_unmerge_equal_reference(shape, dtype):
    torch.manual_seed(sum(shape))
    rows, tokens, width = shape
    x = (torch.randn(shape) * 3).to(dtype)
    r = tokens // 3
    slot, rep = _plan(x.float(), torch.zeros(rows, tokens, dtype=torch.long), r)
    size = _sizes(rows, tokens)
    y, total = ops.token_merge(x, size, slot, tokens - r)
    ry, rtotal = merge_reference(x, size, slot, tokens - r)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and y.shape == (rows, tokens - r, width)
    torch.testing.assert_close(y.float(), ry.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(total, rtotal)
    assert total.sum() == size.sum()
    u = ops.token_unmerge(y, slot)
    assert torch.equal(u, unmerge_reference(y, slot))
    assert u.shape == x.shape


def test_merge_is_the_size_weighted_mean():
    x = torch.tensor([[[1.0], [4.0], [10.0]]])
    slot = torch.tensor([[0, 0, 1]])
    y, total = ops.token_merge(x, torch.tensor([[1.0, 2.0, 5.0]]), slot, 2)
    assert y.flatten().tolist() == [3.0, 10.0] and total.tolist() == [[3.0, 5.0]]


def test_strided_inputs():
    x = torch.randn(7, 3, 20).transpose(0, 1)  # [3, 7, 20], not contiguous
    slot, rep = _plan(x, torch.zeros(3, 7, dtype=torch.long), 2)
    size = _sizes(3, 7)
    torch.testing.assert_close(ops.token_merge(x, size, slot, 5)[0],
                               merge_reference(x, size, slot, 5)[0])
    assert torch.equal(ops.token_unmerge(x[:, :5], slot), unmerge_reference(x[:, :5], slot))


@pytest.mark.parametrize("which", ["native", "portable"])
def test_kernel_on_each_build(which, kernel_build):
    ext = kernel_build(cpu, which)
    mod = ext.load()
    torch.manual_seed(3)
    for rows, tokens, width in [(1, 130, 384), (3, 17, 45)]:
        x = torch.randn(rows, tokens, width)
        slot, rep = _plan(x, torch.zeros(rows, tokens, dtype=torch.long), tokens // 2)
        size = _sizes(rows, tokens)
        y, total = mod.token_merge_cpu(x, size, slot, tokens - tokens // 2)
        ry, rtotal = merge_reference(x, size, slot, tokens - tokens // 2)
        torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-5)
        assert torch.equal(mod.token_unmerge_cpu(y, slot), unmerge_reference(y, slot))


@needs_kernel
def test_bad_slots_are_errors():
    x = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.token_merge(x, torch.ones(1, 4), torch.tensor([[0, 1, 2, 3]]), 3)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.token_unmerge(x, torch.tensor([[0, 4]]))


def test_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 11, 7, dtype=torch.bfloat16)
        best, partner = ops.token_match(x, torch.empty(2, 11, dtype=torch.long), True)
        slot, rep = ops.token_assign(best, partner, 3, 11)
        y, total = ops.token_merge(x, torch.empty(2, 11), slot, 8)
        u = ops.token_unmerge(y, slot)
    assert best.shape == (2, 6) and best.dtype == torch.float32 and partner.dtype == torch.long
    assert slot.shape == (2, 11) and rep.shape == (2, 8)
    assert y.shape == (2, 8, 7) and y.dtype == torch.bfloat16 and total.shape == (2, 8)
    assert u.shape == (2, 11, 7)


def test_opcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 6)
    g = torch.zeros(2, 9, dtype=torch.long)
    torch.library.opcheck(ops.token_match.default, (x, g, True))
    best, partner = ops.token_match(x, g, True)
    torch.library.opcheck(ops.token_assign.default, (best, partner, 3, 9))
    slot, rep = ops.token_assign(best, partner, 3, 9)
    torch.library.opcheck(ops.token_merge.default, (x, torch.ones(2, 9), slot, 6))
    torch.library.opcheck(ops.token_unmerge.default, (x[:, :6].contiguous(), slot))


_INTERPRET = r"""
import torch
from dyncompile.ops.token_merge.triton import token_merge, token_unmerge
from dyncompile.ops.token_merge.reference import merge_reference, unmerge_reference
g = torch.Generator().manual_seed(0)
for rows, tokens, width, n_out in [(1, 1, 1, 1), (2, 9, 130, 5), (3, 17, 33, 17)]:
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(rows, tokens, width, generator=g).to(dtype)
        slot = torch.randint(0, n_out, (rows, tokens), generator=g)
        slot[:, :n_out] = torch.arange(n_out)
        size = torch.randint(1, 4, (rows, tokens), generator=g).float()
        y, total = token_merge(x, size, slot, n_out)
        ry, rtotal = merge_reference(x, size, slot, n_out)
        assert torch.allclose(y.float(), ry.float(), atol=1e-3, rtol=1e-3), (rows, tokens)
        assert torch.allclose(total, rtotal)
        assert torch.equal(token_unmerge(y, slot), unmerge_reference(y, slot))
print("ok")
"""


def test_triton_kernels_under_interpreter():
    assert_runs_interpreted(_INTERPRET)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernels_on_gpu(dtype):
    x = torch.randn(3, 70, 300, device="cuda").to(dtype)
    slot, rep = _plan(x.float(), torch.zeros(3, 70, dtype=torch.long, device="cuda"), 30)
    size = torch.ones(3, 70, device="cuda")
    y, _ = ops.token_merge(x, size, slot, 40)
    torch.testing.assert_close(y.float(), merge_reference(x, size, slot, 40)[0].float(),
                               atol=2e-2, rtol=2e-2)
    assert torch.equal(ops.token_unmerge(y, slot), unmerge_reference(y, slot))
