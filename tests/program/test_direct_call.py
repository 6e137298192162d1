"""DirectCall: a compiled piece's generated code, called without the wrappers once it
has agreed with them; the wrapped call with grad, for mutating graphs, or on disagreement."""

import torch
from torch import fx
from torch._inductor.compile_fx import compile_fx

from dyncompile.program.direct_call import DirectCall, mutates, output_code


class _Block(torch.nn.Module):
    def forward(self, x, w, b):
        h = torch.nn.functional.linear(x, w, b).relu()
        return h * 2.0, h.sum(-1)


class _Writes(torch.nn.Module):
    def forward(self, x):
        x.add_(1.0)
        return (x * 2.0,)


def _compiled(module, *example):
    gm = fx.symbolic_trace(module)
    return gm, compile_fx(gm, list(example))


def _args(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g),
            torch.randn(3, generator=g))


def test_checked_once_then_called_directly_and_equal():
    gm, fn = _compiled(_Block(), *_args())
    call = DirectCall(fn, gm)
    assert call.inner is not None and output_code(fn) is not None
    with torch.no_grad():
        first = call(*_args(1))
        assert call.direct
        call.compiled = None  # from now on the wrappers are not needed
        second = call(*_args(1))
        other = call(*_args(2))
    want = gm(*_args(1))
    for got in (first, second):
        assert len(got) == 2
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(other[0], gm(*_args(2))[0])


def test_grad_mode_goes_through_the_wrappers():
    gm, fn = _compiled(_Block(), *_args())
    call = DirectCall(fn, gm)
    seen = []

    def wrapped(*a):
        seen.append(1)
        return fn(*a)

    call.compiled = wrapped
    out = call(*_args(3))        # grad enabled: wrapped, and nothing checked yet
    assert seen == [1] and call.checked is None
    torch.testing.assert_close(out[1], gm(*_args(3))[1])


def test_disagreeing_generated_code_is_not_used():
    gm, fn = _compiled(_Block(), *_args())
    call = DirectCall(fn, gm)
    call.inner = lambda args: [torch.zeros(5, 3), torch.zeros(5)]
    with torch.no_grad():
        out = call(*_args(4))
    assert call.checked is False and not call.direct
    torch.testing.assert_close(out[0], gm(*_args(4))[0])


def test_generated_code_that_fails_is_not_used():
    gm, fn = _compiled(_Block(), *_args())
    call = DirectCall(fn, gm)

    def boom(args):
        raise TypeError("unexpected calling convention")

    call.inner = boom
    with torch.no_grad():
        out = call(*_args(5))
    assert call.checked is False
    torch.testing.assert_close(out[1], gm(*_args(5))[1])


def test_mutating_graphs_keep_the_wrappers():
    gm = fx.symbolic_trace(_Writes())
    assert mutates(gm)
    assert not mutates(fx.symbolic_trace(_Block()))
    call = DirectCall(lambda *a: gm(*a), gm)
    x = torch.zeros(2)
    with torch.no_grad():
        call(x)
    assert call.inner is None and not call.direct
    assert torch.equal(x, torch.ones(2))  # written once, by the one call
