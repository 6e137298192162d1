"""token_mean: the serial CPU kernel equals the reference on odd shapes (and falls back to
torch's mean where it does not apply); fake kernel and opcheck; the CPU kernel is the one
the dispatcher picks once built."""

import pytest
import torch

from dyncompile.ops.token_mean import op as _op  # noqa: F401  (registers the op)
from dyncompile.ops.token_mean.cpu import SERIAL_MAX, kernel_available
from dyncompile.ops.token_mean.reference import token_mean_reference

op = torch.ops.dyncompile.token_mean
needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C++ compiler")

SHAPES = [(1, 1, 1), (1, 128, 384), (3, 7, 5), (2, 1, 33), (5, 17, 19),
          (1, SERIAL_MAX // 64 + 3, 64)]  # the last one is above SERIAL_MAX: torch's mean


@needs_kernel
def test_the_cpu_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dyncompile::token_mean", "CPU")


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_reference_on_odd_shapes(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    got = op(x)
    assert got.shape == (shape[0], shape[2]) and got.dtype == torch.float32
    torch.testing.assert_close(got, token_mean_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
                                  lambda x: x.bfloat16(), lambda x: x.double()],
                         ids=["strided", "bf16", "fp64"])
def test_strided_and_other_dtypes(make):
    torch.manual_seed(1)
    x = make(torch.randn(4, 9, 13))
    torch.testing.assert_close(op(x), token_mean_reference(x), rtol=1e-3, atol=1e-3)


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = op(torch.empty(2, 11, 7, dtype=torch.bfloat16))
    assert y.shape == (2, 7) and y.dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 5, 8), (3, 7, 5)])
def test_opcheck(shape):
    torch.library.opcheck(op.default, (torch.randn(shape),))
