"""expert_ffn: kernels equal the reference on odd shapes; opcheck; stats; interpreter test."""

import pytest
import torch
import torch.nn.functional as F

import dyncompile.forms.expert.ops  # noqa: F401  (registers the op)
from dyncompile.core import stats
from dyncompile.ops.expert_ffn import cpu
from dyncompile.ops.expert_ffn.cpu import PATHS, choose_path, expert_ffn_cpu, kernel_available
from dyncompile.ops.expert_ffn.reference import (
    ACTIVATIONS,
    expert_bounds,
    expert_ffn_reference,
    expert_widths,
)
from tests.ops.conftest import BUILDS, assert_runs_interpreted

op = torch.ops.dyncompile.expert_ffn

D, H, E, D_OUT = 37, 53, 5, 29  # H not divisible by E, D_out != D


def _case(tokens, glu=False, bias=True, seed=0, d=D, hidden=H, d_out=D_OUT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    w_up = torch.randn(hidden, d, generator=g) / d ** 0.5
    b_up = torch.randn(hidden, generator=g) if bias else None
    w_gate = torch.randn(hidden, d, generator=g) / d ** 0.5 if glu else None
    b_gate = torch.randn(hidden, generator=g) if glu and bias else None
    w_down_t = torch.randn(hidden, d_out, generator=g) / hidden ** 0.5
    b_down = torch.randn(d_out, generator=g) if bias else None
    return [x, w_up, b_up, w_gate, b_gate, w_down_t, b_down]


def _mask(tokens, experts=E, p=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(tokens, experts, generator=g) < p
    m[:, 1] = False  # an expert no token picks
    if tokens > 1:
        m[0] = True  # a token that picks every expert
        m[-1] = False  # a token that picks none
    return m


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_expert_bounds():
    assert expert_bounds(53, 5) == [(0, 10), (10, 21), (21, 31), (31, 42), (42, 53)]
    assert sum(expert_widths(53, 5)) == 53 and expert_widths(3, 5) == [0, 1, 0, 1, 1]


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_kernel_matches_reference(tokens, glu, bias, activation):
    args = _case(tokens, glu, bias)
    m = _mask(tokens)
    _close(op(*args, m, activation), expert_ffn_reference(*args, m, activation))


@pytest.mark.parametrize("tokens", [1, 3, 7, 64])
@pytest.mark.parametrize("glu", [False, True])
def test_every_cpu_path_matches_reference(tokens, glu):
    args = _case(tokens, glu)
    shared = torch.tensor([[True, True, False, False, True]]).expand(tokens, E)
    for m in (_mask(tokens), shared, torch.zeros(tokens, E, dtype=torch.bool)):
        ref = expert_ffn_reference(*args, m, "gelu")
        same_rows = bool((m == m[:1]).all())
        for path in PATHS:
            if path == "shared" and not same_rows:
                with pytest.raises(ValueError, match="same experts"):
                    expert_ffn_cpu(*args, m, "gelu", path)
                continue
            y, pairs, units, taken = expert_ffn_cpu(*args, m, "gelu", path)
            assert taken == path and pairs == int(m.sum())
            _close(y, ref)


def test_choose_path():
    assert choose_path(1, 32, 1536, 32, True, True) == "fused"
    assert choose_path(16, 32, 1536, 16 * 8, False, True) == "fused"
    assert choose_path(32, 32, 1536, 32 * 8, False, True) == "fused"
    assert choose_path(16, 32, 1536, 16 * 20, False, True) == "grouped"
    assert choose_path(64, 32, 1536, 64 * 28, False, True) == "dense"  # too dense
    assert choose_path(1, 32, 1536, 8, True, False) == "shared"
    # fp32 (block kernel): grouped up to ~3/4 of the experts at 64-unit experts ...
    assert choose_path(128, 24, 1536, 128 * 12, False, True) == "grouped"
    assert choose_path(128, 24, 1536, 128 * 20, False, True) == "grouped"
    assert choose_path(128, 24, 1536, 128 * 21, False, True) == "dense"
    # ... less for narrower experts
    assert choose_path(128, 96, 1536, 128 * 66, False, True) == "dense"
    assert choose_path(4096, 16, 1536, 4096 * 8, False, True) == "grouped"
    # other dtypes (torch GEMMs per expert): sparse selections and big blocks only
    assert choose_path(4096, 16, 1536, 4096 * 4, False, False) == "grouped"
    assert choose_path(4096, 16, 1536, 4096 * 8, False, False) == "dense"  # too dense
    assert choose_path(4096, 16, 3072, 4096 * 8, False, False) == "grouped"  # wider experts
    assert choose_path(64, 16, 1536, 64 * 4, False, False) == "dense"  # too few tokens


def _block_mask(tokens, experts, seed=4):
    """Random, plus: an empty expert, adjacent experts with the same tokens (merged
    into one GEMM), a token that picks every expert and one that picks none."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(tokens, experts, generator=g) < 0.5
    m[:, 1] = False
    m[:, 3] = m[:, 2]
    m[0] = True
    m[-1] = False
    return m


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tile", [1, 7, 10 ** 6])  # split by token tiles or by experts
def test_block_kernel_matches_reference(glu, bias, activation, tile, monkeypatch):
    if not kernel_available():
        pytest.skip("no C++ compiler")
    monkeypatch.setattr(cpu, "GROUPED_TILE", tile)
    for tokens, experts, hidden in [(50, E, H), (33, 7, 130), (21, E, 3)]:
        args = _case(tokens, glu, bias, hidden=hidden)
        m = _block_mask(tokens, experts)
        y, pairs, units, taken = expert_ffn_cpu(*args, m, activation, "grouped")
        assert taken == "grouped" and pairs == int(m.sum())
        widths = torch.tensor(expert_widths(hidden, experts), dtype=torch.float64)
        assert units == int(m.double().sum(0) @ widths)
        _close(y, expert_ffn_reference(*args, m, activation))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("blas", [True, False])
def test_block_kernel_threads_and_fallback(threads, blas, monkeypatch):
    if not kernel_available():
        pytest.skip("no C++ compiler")
    mod = cpu._EXT.load()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mod.use_blas(blas)
        for tile in (16, 10 ** 6):
            monkeypatch.setattr(cpu, "GROUPED_TILE", tile)
            for tokens in (1, 2, 40, 101):
                args = _case(tokens, glu=True, seed=tokens)
                for m in (_block_mask(tokens, E), torch.ones(tokens, E, dtype=torch.bool),
                          torch.zeros(tokens, E, dtype=torch.bool)):
                    y, *_ = expert_ffn_cpu(*args, m, "gelu", "grouped")
                    _close(y, expert_ffn_reference(*args, m, "gelu"))
    finally:
        mod.use_blas(True)
        torch.set_num_threads(before)


@pytest.mark.parametrize("d_out", [48, 64, 192])
@pytest.mark.parametrize("tile", [5, 10 ** 6])  # split by token tiles or by experts
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("build", BUILDS)
def test_block_kernel_adds_the_down_projection_into_the_output_rows(d_out, tile, glu, build,
                                                                    monkeypatch, kernel_build):
    """An output width that is a multiple of the tile (64 columns with AVX-512, 16 with
    narrower vectors) takes the register-tiled down projection (six rows at a time, then
    the rest one by one): equal to the reference and to the sgemm path on token counts
    that leave every remainder of six, on the native and the portable build."""
    if not kernel_available():
        pytest.skip("no C++ compiler")
    mod = kernel_build(cpu, build).load()
    monkeypatch.setattr(cpu, "GROUPED_TILE", tile)
    for tokens in (1, 6, 7, 11, 40, 65):
        args = _case(tokens, glu=glu, seed=tokens, hidden=70, d_out=d_out)
        m = _block_mask(tokens, 6, seed=tokens)
        ref = expert_ffn_reference(*args, m, "gelu")
        y = expert_ffn_cpu(*args, m, "gelu", "grouped")[0]
        _close(y, ref)
        mod.use_blas(False)  # the at::mm path: a product buffer and a second pass
        try:
            y_mm = expert_ffn_cpu(*args, m, "gelu", "grouped")[0]
        finally:
            mod.use_blas(True)
        _close(y, y_mm)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("tile", [5, 10 ** 6])  # split by token tiles or by experts
@pytest.mark.parametrize("build", BUILDS)
def test_block_kernel_reads_packed_up_weights(glu, bias, activation, tile, build, monkeypatch,
                                              kernel_build):
    """Hidden widths that are multiples of 16 take the up projection from the packed copy,
    token rows read in place: equal to the reference and to the gather + GEMM path, on
    token counts that leave every remainder of six and widths of 1-6 blocks of 16 (and,
    for 96 units in 4 experts, 24-unit experts that only pack when merged)."""
    if not kernel_available():
        pytest.skip("no C++ compiler")
    monkeypatch.setattr(cpu, "GROUPED_TILE", tile)
    kernel_build(cpu, build)
    for tokens, hidden, experts in [(1, 160, 5), (7, 112, 7), (13, 192, 4), (40, 96, 4),
                                    (11, 256, 4), (65, 384, 4)]:
        args = _case(tokens, glu=glu, bias=bias, seed=tokens, hidden=hidden)
        m = _block_mask(tokens, experts, seed=tokens)
        before = cpu.packs_made
        y = expert_ffn_cpu(*args, m, activation, "grouped")[0]
        assert cpu.packs_made - before == (2 if glu else 1)  # up (and gate), once each
        _close(y, expert_ffn_reference(*args, m, activation))
        with monkeypatch.context() as mp:  # the unpacked block path gives the same
            mp.setattr(cpu, "_packed16", lambda w: cpu._EMPTY)
            _close(y, expert_ffn_cpu(*args, m, activation, "grouped")[0])


def test_packed_weights_made_once_and_follow_changes():
    if not kernel_available():
        pytest.skip("no C++ compiler")
    args = _case(9, glu=True, hidden=64)
    m = _block_mask(9, 4)
    before = cpu.packs_made
    for _ in range(3):
        expert_ffn_cpu(*args, m, "gelu", "grouped")
    assert cpu.packs_made - before == 2
    # A view of the same memory (as a compiled graph may pass a parameter) hits the
    # same copy.
    base = cpu.packs_made
    view_args = list(args)
    view_args[1] = args[1].view(64, D)
    expert_ffn_cpu(*view_args, m, "gelu", "grouped")
    assert cpu.packs_made == base
    # An in-place change of a weight is seen: repacked, and the output follows.
    with torch.no_grad():
        args[1].mul_(2.0)
    y = expert_ffn_cpu(*args, m, "gelu", "grouped")[0]
    assert cpu.packs_made == base + 1
    _close(y, expert_ffn_reference(*args, m, "gelu"))


def test_block_kernel_odd_layouts():
    if not kernel_available():
        pytest.skip("no C++ compiler")
    x, wu, bu, wg, bg, wdt, bd = _case(30, glu=True)
    m = _block_mask(30, E)
    ref = expert_ffn_reference(x, wu, bu, wg, bg, wdt, bd, m, "silu")
    # Transposed weights and a strided x: copied to contiguous, same result.
    xs = torch.randn(30, 2 * D)[:, ::2].copy_(x)
    args = (xs, wu.t().contiguous().t(), bu, wg, bg, wdt.t().contiguous().t(), bd)
    _close(expert_ffn_cpu(*args, m, "silu", "grouped")[0], ref)
    # Biases of another dtype (x fp32): cast.
    args = (x, wu, bu.double(), wg, bg.double(), wdt, bd.double())
    _close(expert_ffn_cpu(*args, m, "silu", "grouped")[0], ref)


def test_leading_dims_and_noncontiguous_weights():
    x, wu, bu, wg, bg, wdt, bd = _case(6, glu=True)
    x3 = x.reshape(2, 3, D)
    m = _mask(6)
    # Transposed views: the kernels take any strides.
    args = (x3, wu.t().contiguous().t(), bu, wg, bg, wdt.t().contiguous().t(), bd)
    out = op(*args, m, "silu")
    assert out.shape == (2, 3, D_OUT)
    _close(out, expert_ffn_reference(x3, wu, bu, wg, bg, wdt, bd, m, "silu"))


def test_token_with_no_expert_gets_b_down():
    args = _case(3)
    _close(op(*args, torch.zeros(3, E, dtype=torch.bool), "relu"), args[6].expand(3, D_OUT))
    args = _case(7)
    _close(op(*args, _mask(7), "relu")[-1], args[6])  # the mask's last token picks none


def test_fewer_hidden_units_than_experts():
    args = _case(5, glu=True, hidden=3)  # widths [0, 1, 0, 1, 1]
    m = torch.rand(5, E, generator=torch.Generator().manual_seed(3)) < 0.6
    ref = expert_ffn_reference(*args, m, "silu")
    for path in ("fused", "grouped", "grouped_torch", "dense"):
        _close(expert_ffn_cpu(*args, m, "silu", path)[0], ref)
    _close(op(*args, m, "silu"), ref)


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("glu", [False, True])
def test_all_experts_is_the_dense_ffn(tokens, glu):
    x, wu, bu, wg, bg, wdt, bd = _case(tokens, glu)
    if glu:
        dense = F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wdt.t(), bd)
        act = "silu"
    else:
        dense = F.linear(F.gelu(F.linear(x, wu, bu)), wdt.t(), bd)
        act = "gelu"
    _close(op(x, wu, bu, wg, bg, wdt, bd, torch.ones(tokens, E, dtype=torch.bool), act), dense)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_input(path):
    args = [t.bfloat16() if t is not None else None for t in _case(9, glu=True)]
    m = _mask(9) if path != "shared" else torch.tensor([[True, False, True, True, False]] * 9)
    y, *_ = expert_ffn_cpu(*args, m, "gelu_tanh", path)
    ref = expert_ffn_reference(*[t.float() if t is not None else None for t in args], m,
                               "gelu_tanh")
    torch.testing.assert_close(y, ref, atol=3e-2, rtol=3e-2)
    out = op(*args, m, "gelu_tanh")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_bad_arguments():
    args = _case(2)
    with pytest.raises(ValueError, match="unknown activation"):
        op(*args, _mask(2), "swish")
    with pytest.raises(ValueError, match="mask"):
        op(*args, torch.ones(3, E, dtype=torch.bool), "relu")


def test_cpp_kernel_builds():
    assert kernel_available(), "C++ expert kernel did not build (is a compiler installed?)"


def test_reports_skipped_flops():
    x, wu, bu, wg, bg, wdt, bd = _case(3, glu=True)
    m = _mask(3)
    widths = torch.tensor(expert_widths(H, E), dtype=torch.float64)
    kept = float(m.double().sum(0) @ widths) / (3 * H)
    for path in ("fused", "grouped", "grouped_torch"):
        *_, units, taken = expert_ffn_cpu(x, wu, bu, wg, bg, wdt, bd, m, "gelu", path)
        assert taken == path and units / (3 * H) == pytest.approx(kept)
    dense = 3 * (2.0 * D * H * 2 + 2.0 * H * D_OUT)
    token = stats.begin_call(0.5)
    stats.record_graph(dense, 0.5)
    op(x, wu, bu, wg, bg, wdt, bd, m, "gelu")
    s = stats.end_call(token)
    assert s.spent_flops == pytest.approx(kept * dense)
    assert s.fraction == pytest.approx(kept)
    assert s.ratio("active_experts") == pytest.approx(float(m.float().mean()))


def test_opcheck():
    plain = _case(3)
    glu = _case(4, glu=True, bias=False)
    glu[0] = glu[0].reshape(2, 2, D)
    for args, m, act in [(plain, _mask(3), "gelu"), (glu, _mask(4), "silu")]:
        torch.library.opcheck(op, (*args, m, act))
    grad_args = [t.clone().requires_grad_() if t is not None else None for t in _case(3)]
    torch.library.opcheck(op, (*grad_args, _mask(3), "tanh"))


def test_compiles_without_graph_break():
    x, wu, bu, wg, bg, wdt, bd = _case(2)
    m = _mask(2)

    def f(x, m):
        return op(torch.relu(x), wu, bu, wg, bg, wdt, bd, m, "gelu") * 2

    counter = torch._dynamo.testing.CompileCounter()
    cf = torch.compile(f, backend=counter, fullgraph=True)
    for mm in (m, ~m, torch.ones_like(m)):
        _close(cf(x, mm), f(x, mm))
    assert counter.frame_count == 1


_INTERPRET = r"""
import torch
from dyncompile.ops.expert_ffn.triton import expert_ffn_triton
from dyncompile.ops.expert_ffn.reference import expert_ffn_reference, ACTIVATIONS
g = torch.Generator().manual_seed(0)
D, E, D_OUT = 37, 5, 29
cases = [(1, False, "gelu", 53), (7, True, "silu", 53), (7, False, "gelu_tanh", 53),
         (1, True, "tanh", 53), (3, False, "sigmoid", 53), (3, True, "relu", 53),
         (2, False, "identity", 53), (5, True, "gelu", 3)]  # H=3 < E: experts of width 0
for tokens, glu, act, H in cases:
    x = torch.randn(tokens, D, generator=g)
    wu = torch.randn(H, D, generator=g) / 6
    bu = torch.randn(H, generator=g)
    wg = torch.randn(H, D, generator=g) / 6 if glu else None
    bg = torch.randn(H, generator=g) if glu else None
    wdt = torch.randn(D_OUT, H, generator=g).t() / 7  # a strided view
    bd = torch.randn(D_OUT, generator=g)
    m = torch.rand(tokens, E, generator=g) < 0.5
    m[:, 2] = False  # an empty expert
    m[0, 0] = True
    if tokens > 2:
        m[1] = True
        m[2] = False
    for dt, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        args = [t.to(dt) if t is not None else None for t in (x, wu, bu, wg, bg, wdt, bd)]
        y = expert_ffn_triton(*args, m, act, block_m=16, block_h=16, block_d=32, block_n=32,
                              block_k=16)
        ref = expert_ffn_reference(x, wu, bu, wg, bg, wdt, bd, m, act)
        assert y.dtype == dt
        assert torch.allclose(y.float(), ref, atol=tol, rtol=tol), (tokens, act, dt,
                                                                   (y.float() - ref).abs().max())
print("ok")
"""


def test_triton_kernel_under_interpreter():
    assert_runs_interpreted(_INTERPRET)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_on_gpu(dtype):
    args = [t.cuda().to(dtype) if t is not None else None for t in _case(70, glu=True,
                                                                         d=300, hidden=520)]
    m = _mask(70, experts=16).cuda()
    ref = expert_ffn_reference(*[t.float() if t is not None else None for t in args], m, "gelu")
    torch.testing.assert_close(op(*args, m, "gelu").float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("tokens, experts", [(0, 5), (1, 3), (9, 7), (130, 33)])
def test_mask_stats_counts_pairs_and_spots_identical_rows(tokens, experts):
    if not kernel_available():
        pytest.skip("no C++ compiler")
    mod = cpu._EXT.load()
    m = _mask(tokens, experts)
    assert mod.mask_stats(m) == (int(m.sum()), tokens == 0 or bool((m == m[:1]).all()))
    same = torch.rand(1, experts) < 0.5
    rows = same.expand(tokens, experts).contiguous()
    assert mod.mask_stats(rows) == (int(rows.sum()), True)
    if tokens > 1:
        rows[-1, -1] = ~rows[-1, -1]
        assert mod.mask_stats(rows)[1] is False
