"""Dead-code elimination keeps in-place writes whose result nothing reads."""

import torch
from torch import fx

from dyncompile.passes.graph_utils import eliminate_dead_code, mutates


def _graph():
    g = fx.Graph()
    x, m = g.placeholder("x"), g.placeholder("m")
    fill = g.call_method("masked_fill_", (x, m, 0.0))  # result unused: x is written
    relu = g.call_function(torch.relu_, (x,))  # result unused: x is written
    dead = g.call_method("add", (x, 1.0))  # pure and unused
    g.output(x)
    return g, fill, relu, dead


def test_in_place_writes_survive_and_pure_dead_nodes_go():
    g, fill, relu, dead = _graph()
    assert [mutates(n) for n in (fill, relu, dead)] == [True, True, False]
    eliminate_dead_code(g)
    left = [n.target for n in g.nodes if n.op in ("call_method", "call_function")]
    assert left == ["masked_fill_", torch.relu_]
    gm = fx.GraphModule(torch.nn.Module(), g)
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    out = gm(x.clone(), torch.tensor([[True, False], [False, False]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0], [3.0, 0.0]]))


def test_plain_fx_dead_code_elimination_would_drop_them():
    g, *_ = _graph()
    g.eliminate_dead_code()  # FX's default: the reason for the helper
    assert not [n for n in g.nodes if n.op in ("call_method", "call_function")]


def test_schema_mutable_ops_count_as_writes():
    g = fx.Graph()
    x = g.placeholder("x")
    n = g.call_function(torch.ops.aten.add_.Tensor, (x, x))
    assert mutates(n)
