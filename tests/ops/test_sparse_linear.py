"""sparse_linear: kernels equal the reference on odd shapes; interpreter test. (The ops
built on them, gated_linear and cats_glu, are opchecked in their own tests.)"""

import pytest
import torch
import torch.nn.functional as F

from dyncompile.core import stats
from dyncompile.ops.sparse_linear.cpu import kernel_available, sparse_linear_cpu
from dyncompile.ops.sparse_linear.kernels import run_cpu, run_cuda
from dyncompile.ops.sparse_linear.reference import active_rows, sparse_linear_reference
from tests.ops.conftest import BUILDS, assert_runs_interpreted


def op(x, weight_t, bias, threshold):
    """The kernel chosen per call, as the gated form's ops call it."""
    run = run_cuda if x.is_cuda else run_cpu
    return run(x, weight_t, bias, float(threshold))[0]


def _case(tokens, n_in, n_out, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g)
    wt = torch.randn(n_in, n_out, generator=g) / n_in ** 0.5
    b = torch.randn(n_out, generator=g) if bias else None
    return x, wt, b


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("shape", [(37, 53), (128, 96), (300, 17)])
@pytest.mark.parametrize("sparsity_thr", [0.0, 0.3, 1.0, 10.0])
def test_cpu_kernel_matches_reference(tokens, shape, sparsity_thr):
    x, wt, b = _case(tokens, *shape)
    thr = torch.tensor(sparsity_thr)
    ref = sparse_linear_reference(x, wt, b, thr)
    torch.testing.assert_close(op(x, wt, b, thr), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 9, 40])
@pytest.mark.parametrize("shape", [(37, 53), (300, 17), (129, 257)])
@pytest.mark.parametrize("bias", [True, False])
def test_half_precision_weights_sum_in_fp32(dtype, tokens, shape, bias):
    """bf16 / fp16 inputs and weights (a model cast to half precision): the same result
    as the fp32 sum of the same half-precision values, in the input's dtype, on the row
    walk (few tokens) and on the dense path (many)."""
    x, wt, b = _case(tokens, *shape, seed=tokens, bias=bias)
    x, wt = x.to(dtype), wt.to(dtype)
    b = b.to(dtype) if bias else None
    for thr in (0.0, 0.5, 1.5):
        y = op(x, wt, b, thr)
        assert y.dtype == dtype and y.shape == (tokens, shape[1])
        ref = sparse_linear_reference(x, wt, b, thr)
        torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=2e-2)
    if kernel_available():
        y, k, pairs, walked = sparse_linear_cpu(x, wt, b, 1.5, 16, 0.85, 8)
        assert walked == (tokens <= 8 or (tokens <= 16 and k <= 0.85 * shape[0]))
        assert pairs == int((x.float().abs() >= 1.5).sum())


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_on_each_build(build, dtype, kernel_build):
    """The native build and the portable one (same source, narrower vectors) walk the
    active rows and take the dense path with the reference's result, in each precision,
    with and without a per-channel scale."""
    from dyncompile.ops.sparse_linear import cpu

    if not kernel_available():
        pytest.skip("no C++ compiler")
    kernel_build(cpu, build)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for tokens, shape in [(1, (37, 53)), (3, (300, 17)), (9, (129, 257)), (40, (65, 33))]:
        x, wt, b = _case(tokens, *shape, seed=tokens)
        x, wt, b = x.to(dtype), wt.to(dtype), b.to(dtype)
        scale = torch.rand(shape[0]) * 2
        for thr, sc in [(0.0, None), (0.7, None), (0.7, scale)]:
            y, k, pairs, walked = sparse_linear_cpu(x, wt, b, thr, 16, 0.85, 8, sc)
            assert walked == (tokens <= 8 or (tokens <= 16 and k <= 0.85 * shape[0]))
            ref = sparse_linear_reference(x, wt, b, thr, sc)
            torch.testing.assert_close(y.float(), ref.float(), **tol)


@pytest.mark.parametrize("tokens", [1, 5, 30])
def test_per_channel_scale_ranks_by_magnitude_times_scale(tokens):
    """A channel is active where |x| * scale >= thr (WINA's criterion with the weight
    column norms as scale): kernel, torch path and reference agree."""
    x, wt, b = _case(tokens, 131, 77, seed=3)
    scale = torch.rand(131) * 2
    for thr in (0.0, 0.4, 1.0):
        ref = sparse_linear_reference(x, wt, b, thr, scale)
        y, skipped, pairs = run_cpu(x, wt, b, thr, scale)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        assert pairs == (x.numel() if thr == 0 else int((x.abs() * scale >= thr).sum()))
    if tokens <= 16:
        assert skipped > 0
    with_scale = sparse_linear_reference(x, wt, b, 1.0, scale)
    assert not torch.allclose(with_scale, sparse_linear_reference(x, wt, b, 1.0))


def test_threshold_zero_is_the_dense_linear():
    x, wt, b = _case(5, 40, 24)
    torch.testing.assert_close(op(x, wt, b, torch.tensor(0.0)), F.linear(x, wt.t(), b))


def test_leading_dims_no_bias_and_fallback_path():
    x, wt, _ = _case(6, 33, 21, bias=False)
    x3 = x.reshape(2, 3, 33)
    out = op(x3, wt, None, torch.tensor(0.5))
    assert out.shape == (2, 3, 21)
    torch.testing.assert_close(out, sparse_linear_reference(x3, wt, None, 0.5), atol=1e-5,
                               rtol=1e-5)
    # every channel dropped: output is the bias
    x, wt, b = _case(3, 10, 4)
    torch.testing.assert_close(op(x, wt, b, torch.tensor(1e9)), b.expand(3, 4))


def test_cpp_kernel_builds_and_matches():
    assert kernel_available(), "C++ sparse kernel did not build (is a compiler installed?)"
    x, wt, b = _case(3, 257, 129)
    y, k, pairs, skipped = sparse_linear_cpu(x, wt, b, 0.8, 16, 0.85)
    torch.testing.assert_close(y, sparse_linear_reference(x, wt, b, 0.8), atol=1e-5, rtol=1e-5)
    assert skipped and k == len(active_rows(x, 0.8)) < 257
    assert pairs == int((x.abs() >= 0.8).sum())
    # too many tokens: the dense GEMM on the masked input, same result
    x, wt, b = _case(40, 65, 33)
    y, k, pairs, skipped = sparse_linear_cpu(x, wt, b, 0.5, 16, 0.85)
    assert not skipped
    torch.testing.assert_close(y, sparse_linear_reference(x, wt, b, 0.5), atol=1e-5, rtol=1e-5)
    # few tokens with a full union: the row walk still runs when rows_always allows it
    x, wt, b = _case(4, 65, 33)
    y, k, _, skipped = sparse_linear_cpu(x, wt, b, 1e-6, 16, 0.85, rows_always=8)
    assert skipped and k == 65
    torch.testing.assert_close(y, sparse_linear_reference(x, wt, b, 1e-6), atol=1e-5, rtol=1e-5)
    assert not sparse_linear_cpu(x, wt, b, 1e-6, 16, 0.85)[3]
    x, wt, b = _case(40, 65, 33)
    # a non-contiguous weight view is accepted (dense path)
    y, *_ = sparse_linear_cpu(x[:2], wt.t().contiguous().t(), b, 0.5, 16, 0.85)
    torch.testing.assert_close(y, sparse_linear_reference(x[:2], wt, b, 0.5), atol=1e-5,
                               rtol=1e-5)


def test_run_cpu_gives_what_it_skipped():
    x, wt, b = _case(1, 200, 50)
    y, skipped, pairs = run_cpu(x, wt, b, 1.0)
    k = len(active_rows(x, 1.0))
    torch.testing.assert_close(y, sparse_linear_reference(x, wt, b, 1.0), atol=1e-5, rtol=1e-5)
    assert skipped == pytest.approx(2.0 * (200 - k) * 50)
    assert pairs == int((x.abs() >= 1.0).sum())
    # the kernels are pure: they report nothing to the call's stats
    token = stats.begin_call(0.5)
    stats.record_graph(2.0 * 200 * 50, 0.5)
    run_cpu(x, wt, b, 1.0)
    assert stats.end_call(token).fraction == 1.0


_INTERPRET = r"""
import torch
from dyncompile.ops.sparse_linear.triton import sparse_linear_triton
from dyncompile.ops.sparse_linear.reference import sparse_linear_reference
g = torch.Generator().manual_seed(0)
cases = [(1, 37, 19, 0.5), (2, 64, 40, 0.0), (7, 70, 33, 1.2), (3, 16, 8, 9.0)]
for tokens, n_in, n_out, thr in cases:
    x = torch.randn(tokens, n_in, generator=g)
    wt = torch.randn(n_in, n_out, generator=g)
    b = torch.randn(n_out, generator=g)
    for scale in (None, torch.rand(n_in, generator=g) * 2):
        y = sparse_linear_triton(x, wt, b, thr, block_k=32, block_n=32, scale=scale)
        ref = sparse_linear_reference(x, wt, b, thr, scale)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (tokens, (y - ref).abs().max())
print("ok")
"""


def test_triton_kernel_under_interpreter():
    assert_runs_interpreted(_INTERPRET)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_on_gpu(dtype):
    x, wt, b = (t.cuda().to(dtype) for t in _case(7, 300, 130))
    thr = torch.tensor(0.6)
    ref = sparse_linear_reference(x.float(), wt.float(), b.float(), thr).to(dtype)
    torch.testing.assert_close(op(x, wt, b, thr), ref, atol=2e-2, rtol=2e-2)


def test_registered_dense_kernel_runs_the_dense_calls_and_goes_with_the_weight():
    import gc

    from dyncompile.ops.sparse_linear import kernels

    torch.manual_seed(0)
    w = torch.randn(40, 24).t()  # (out, in) as F.linear takes it, input-major memory
    x, b = torch.randn(3, 40), torch.randn(24)
    calls, packed = [], w.clone()  # the engine's own copy (a kernel must not hold w)

    def fast(x2, bias):
        calls.append(x2.shape)
        return F.linear(x2, packed, bias)

    kernels.register_dense(w, fast)
    wt = w.t()  # what the forms pass: a view of the same storage
    y, skipped, _ = run_cpu(x, wt, b, 0.0)
    assert calls == [(3, 40)] and skipped == 0.0
    torch.testing.assert_close(y, F.linear(x, w, b))
    run_cpu(x, torch.randn(40, 24), b, 0.0)  # another weight: F.linear, not the kernel
    assert len(calls) == 1
    y, skipped, _ = run_cpu(x[:1], wt, b, 0.5)  # a call that walks its rows does not use it
    assert len(calls) == 1 and skipped > 0
    n = len(kernels._DENSE)
    del w, wt, fast
    gc.collect()
    assert len(kernels._DENSE) == n - 1


def test_registered_dense_kernel_takes_the_batched_calls_whose_union_is_wide():
    from dyncompile.ops.sparse_linear import kernels

    torch.manual_seed(1)
    w = torch.randn(37, 40).t().contiguous().t()  # (out 37, in 40), input-major memory
    b = torch.randn(37)
    calls = []

    def fast(x2, bias):
        calls.append(x2.clone())
        return F.linear(x2, w.detach().clone(), bias)

    kernels.register_dense(w, fast)
    wt = w.t()
    x = torch.randn(8, 40)  # |x| >= 0.67 on about half the pairs: the union of 8 is ~all
    thr = 0.67
    y, skipped, pairs = run_cpu(x, wt, b, thr)
    kept = x * (x.abs() >= thr)
    assert len(calls) == 1 and skipped == 0.0 and pairs == float((kept != 0).sum())
    torch.testing.assert_close(calls[0], kept)  # the engine's GEMM gets the masked input
    torch.testing.assert_close(y, sparse_linear_reference(x, wt, b, thr))
    # one token walks its rows whatever its union; the engine kernel is not called
    y1, skipped1, _ = run_cpu(x[:1], wt, b, thr)
    assert len(calls) == 1 and skipped1 > 0
    torch.testing.assert_close(y1, sparse_linear_reference(x[:1], wt, b, thr))
    # a narrow union at 8 tokens still walks (same channels active in every token)
    xs = x.clone()
    xs[:, 12:] = 0
    y8, skipped8, _ = run_cpu(xs, wt, b, thr)
    assert len(calls) == 1 and skipped8 > 0
    torch.testing.assert_close(y8, sparse_linear_reference(xs, wt, b, thr))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2, 5, 12, 40])
def test_one_threshold_per_row(build, dtype, tokens, kernel_build):
    """Rows masked at their own thresholds (0: dense row), on the row walk and the GEMM
    path: each row equals the reference at its threshold alone."""
    from dyncompile.ops.sparse_linear import cpu

    kernel_build(cpu, build)
    x, wt, b = _case(tokens, 67, 45, seed=tokens)
    x, wt, b = x.to(dtype), wt.to(dtype), b.to(dtype)
    thr = torch.tensor([(0.0, 0.4, 1.2)[i % 3] for i in range(tokens)])
    y, skipped, pairs = run_cpu(x, wt, b, thr)
    mask = x.float().abs() >= thr[:, None]
    assert pairs == float(mask.sum())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for i in range(tokens):
        ref = sparse_linear_reference(x[i:i + 1], wt, b, float(thr[i]))
        torch.testing.assert_close(y[i:i + 1].float(), ref.float(), **tol)
    torch.testing.assert_close(y.float(), sparse_linear_reference(x, wt, b, thr).float(), **tol)
    with pytest.raises(ValueError, match="row thresholds"):
        run_cpu(x, wt, b, thr[:-1])
