"""Both entry points: outputs equal eager and the default Inductor backend."""

import pytest
import torch

import dyncompile
from dyncompile.testing import (
    assert_compute_falls,
    assert_matches_dense,
    compare_outputs,
)
from dyncompile.testing.zoo import ZOO, load_minilm, minilm_inputs


def test_backend_string_works_after_import_torch_alone():
    import subprocess
    import sys

    code = ("import torch; assert 'dyn' in torch._dynamo.list_backends(); "
            "m = torch.nn.Linear(4, 4); "
            "c = torch.compile(m, backend='dyn', options={'compiler': 'eager'}); "
            "x = torch.randn(2, 4); assert torch.allclose(c(x), m(x)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
def test_dyn_equals_inductor_and_eager_on_bert():
    entry = ZOO["bert"]
    model = entry.build()
    inputs = entry.inputs(2, 8)
    with torch.no_grad():
        eager = model(**inputs)
        dyn = torch.compile(model, backend="dyn", options={"budget": 0.5})(**inputs)
        torch._dynamo.reset()
        ind = torch.compile(model)(**inputs)
    compare_outputs(dyn, eager, atol=1e-5, rtol=1e-5)
    compare_outputs(dyn, ind, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_optimize_minilm_matches_dense():
    model = load_minilm()
    inputs = minilm_inputs(2, 32)
    opt = dyncompile.optimize(model, budget=0.5, methods=[], calibration=[inputs])
    assert assert_matches_dense(model, opt, inputs, atol=1e-4) < 1e-4
    assert opt.stats.dense_flops > 0 and opt.stats.fraction == 1.0


def test_trace_error_says_where():
    class Broken(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent branch is fine (graph break) ...
                x = x + 1
            return x.reshape(5, 7)  # ... but this shape is wrong

    opt = dyncompile.optimize(Broken(), methods=[], compiler="eager")
    with pytest.raises(dyncompile.TraceError, match="test_backend.py:.* in forward"):
        opt(torch.ones(2, 3))


def test_graph_breaks_still_run_and_count_all_graphs():
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            print("", end="")  # graph break
            return self.b(x)

    model = Breaks().eval()
    opt = dyncompile.optimize(model, methods=[], compiler="eager")
    x = torch.randn(3, 8)
    assert_matches_dense(model, opt, (x,))
    assert opt.stats.graphs == 2 and opt.stats.dense_flops == 2 * (2 * 3 * 8 * 8)


def test_compute_falls_helper_fails_without_a_form():
    entry = ZOO["mlp"]
    opt = dyncompile.optimize(entry.build(), methods=[], compiler="eager")
    with pytest.raises(AssertionError, match="did not fall"):
        assert_compute_falls(opt, entry.inputs(1, 4))


def test_matches_dense_helper_fails_on_a_different_model():
    entry = ZOO["mlp"]
    model, other = entry.build(), entry.build()
    with torch.no_grad():
        other.fc2.bias.add_(0.1)
    opt = dyncompile.optimize(other, methods=[], compiler="eager")
    with pytest.raises(AssertionError, match="differs from dense"):
        assert_matches_dense(model, opt, entry.inputs(1, 4))
