"""Detection finds the right blocks, with the right counts, on every architecture."""

import pytest
import torch

from dyncompile.passes.detect import detect_blocks
from dyncompile.passes.graph_utils import matmul_operands, op_kind
from dyncompile.passes.linears import find_linears
from dyncompile.testing.zoo import MINILM_EXPECTED, ZOO, load_minilm, minilm_inputs
from tests.conftest import capture_graphs


def _detect(name, batch=2, seq=8):
    entry = ZOO[name]
    sets = capture_graphs(entry.build(), entry.inputs(batch, seq), lambda gm, _: detect_blocks(gm))
    return entry, sets


@pytest.mark.parametrize("name", sorted(ZOO))
def test_block_counts(name):
    entry, sets = _detect(name)
    counts = {k: sum(s.counts()[k] for s in sets) for k in ("ffn", "attention", "residual")}
    assert counts == entry.expected


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "vit", "prenorm"])
def test_blocks_record_weights_and_names(name):
    _, sets = _detect(name)
    for s in sets:
        names = {}
        for b in s.blocks:
            assert b.name, b
            assert (b.kind, b.name) not in names, f"duplicate name {b.name}"
            names[(b.kind, b.name)] = b
            assert b.weights and all(w.path and len(w.shape) == 2 for w in b.weights)
            assert b.nodes and b.output in b.nodes or b.kind != "residual"
            assert float(b.flops_at({"B": 2, "S": 8})) > 0


def test_gpt2_conv1d_ffn_and_fused_qkv():
    _, (s,) = _detect("gpt2")
    ffn = s.ffn[0]
    assert not ffn.gated and ffn.hidden == 128
    assert ffn.up[0].layout == "in_out" and ffn.down.layout == "in_out"  # Conv1D addmm
    assert ffn.name == "transformer.h.0.mlp"
    assert any(n.target == torch.tanh for n in ffn.activation)  # gelu_new expanded
    attn = s.attention[0]
    assert attn.fused_qkv and attn.q.weight_name == "transformer.h.0.attn.c_attn.weight"
    assert attn.o.weight_name == "transformer.h.0.attn.c_proj.weight"


def test_llama_glu_ffn_and_gqa_attention():
    _, (s,) = _detect("llama")
    ffn = s.ffn[0]
    assert ffn.gated and len(ffn.up) == 2
    assert ffn.gate.weight_name.endswith("mlp.gate_proj.weight")
    assert ffn.down.weight_name.endswith("mlp.down_proj.weight")
    attn = s.attention[0]
    assert not attn.fused_qkv and not attn.cross
    assert attn.k.out_features == 16 and attn.q.out_features == 32  # 2 kv heads of 4


def test_t5_cross_attention():
    _, (s,) = _detect("t5")
    cross = [a for a in s.attention if a.cross]
    assert len(cross) == 2
    assert all("EncDecAttention" in a.name for a in cross)
    assert all(not a.cross for a in s.attention if "SelfAttention" in a.name)


def test_eager_softmax_attention_core():
    _, (s,) = _detect("bert-eager")
    assert [len(a.core) for a in s.attention] == [3, 3]  # matmul, softmax, matmul


def test_residual_branch_contains_blocks():
    _, (s,) = _detect("llama")
    res = s.residual
    assert [r.contains for r in res] == [
        ["model.layers.0.self_attn"], ["model.layers.0.mlp"],
        ["model.layers.1.self_attn"], ["model.layers.1.mlp"]]
    for r in res:
        assert r.skip in r.add.args and r.branch_output in r.add.args
        assert r.branch_output in r.nodes


PARALLEL = ["parallel", "parallel-2norm", "gptj", "gpt-neox-parallel", "falcon", "phi",
            "cohere"]


@pytest.mark.parametrize("name,terms,norms", [
    ("parallel", 2, 1), ("parallel-2norm", 2, 2), ("gptj", 2, 1), ("gpt-neox-parallel", 2, 2),
    ("falcon", 1, 1), ("phi", 2, 1), ("cohere", 2, 1)])
def test_parallel_block_is_one_residual_around_its_attention_and_mlp(name, terms, norms):
    """Attention and MLP read one normalized x (or two norms of it) and are summed into x:
    per layer one FFN, one attention and one residual whose branch holds both, its skip
    the layer's input (the previous layer's sum). ``terms``: the sum's terms other than x
    (Falcon adds the attention into the MLP output, then adds x to that)."""
    _, (s,) = _detect(name)
    assert s.counts() == {"ffn": 2, "attention": 2, "residual": 2}
    layers = list(zip(s.attention, s.ffn, s.residual))
    for i, (attn, ffn, res) in enumerate(layers):
        assert sorted(res.contains) == sorted([attn.name, ffn.name])
        assert attn.name != ffn.name and attn.name.rsplit(".", 1)[0] == res.name
        assert attn.output in res.nodes and ffn.output in res.nodes
        assert len(res.branches) == terms and res.branch_output in res.add.args
        assert res.skip not in res.branches
        if i:
            assert res.skip is layers[i - 1][2].add     # the stream: layer i reads sum i-1
    # both read x through a norm: the same norm, or one each (ln1(x), ln2(x))
    for attn, ffn, res in layers:
        assert (attn.q.logical_input is ffn.input) == (norms == 1)
        for read in (attn.q.logical_input, ffn.input):
            assert read is not res.skip and read in res.nodes


def test_parallel_sum_in_any_bracketing():
    """(x + attn) + mlp (the hand-written block, Cohere) and (attn + mlp) + x (GPT-J) are
    one residual each: x is a term of the sum, deeper in it or an input of its last add."""
    _, (s,) = _detect("parallel")
    for r in s.residual:
        assert r.skip not in r.add.args
        inner = next(a for a in r.add.args if a is not r.branch_output)
        assert r.skip in inner.args and inner in r.nodes     # (x + attn): inside the block
        assert r.branch_output is s.ffn[s.residual.index(r)].output
    _, (s,) = _detect("gptj")
    for r in s.residual:
        assert r.skip in r.add.args and set(r.branch_output.args) == set(r.branches)


def test_sequential_residuals_have_one_branch_term():
    _, (s,) = _detect("llama")
    assert [len(r.branches) for r in s.residual] == [1, 1, 1, 1]
    assert all(r.branches == [r.branch_output] for r in s.residual)


def test_falcon_linears_written_as_matmul_with_a_transposed_weight():
    """Falcon multiplies by ``weight.T`` itself: detection writes those products as
    F.linear on the parameter (the same values) and finds multi-query fused attention."""
    def counts(gm):
        return {k: sum(op_kind(n) == k for n in gm.graph.nodes) for k in ("matmul", "linear")}

    def detect(gm, _):
        before = counts(gm)
        return before, detect_blocks(gm)

    entry = ZOO["falcon"]
    ((before, s),) = capture_graphs(entry.build(), entry.inputs(2, 8), detect)
    assert before == {"matmul": 8, "linear": 0}        # 4 products on W.T per layer
    assert counts(s.gm) == {"matmul": 0, "linear": 8}   # the core is SDPA: no matmul left
    assert len(s.linears) == 8
    attn = s.attention[0]
    assert attn.fused_qkv and attn.q.layout == "out_in"
    assert attn.q.weight_name == "h.0.self_attention.query_key_value.weight"
    assert attn.q.out_features == 32 + 2 * 8              # 4 query heads, one shared k/v
    assert s.ffn[0].up[0].weight_name == "h.0.mlp.dense_h_to_4h.weight"


def test_transposed_weight_products_become_linears_with_the_same_values():
    from dyncompile.passes.detect.canonical import linears_from_transposed_weights

    class Products(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(12, 8))    # (out, in)
            self.b1 = torch.nn.Parameter(torch.randn(12))
            self.w2 = torch.nn.Parameter(torch.randn(8, 12))
            self.w3 = torch.nn.Parameter(torch.randn(12, 8))
            self.w4 = torch.nn.Parameter(torch.randn(8, 8))     # (in, out): x @ w4 as is

        def forward(self, x):
            h = x @ self.w1.T + self.b1                          # -> linear(x, w1, b1)
            h = torch.relu(h).matmul(self.w2.t())                # -> linear(h, w2)
            g = x @ self.w3.transpose(0, 1)                      # -> linear(x, w3)
            return h + x @ self.w4 + (g @ g.transpose(-1, -2)) @ x

    def check(gm, example):
        kinds = [op_kind(n) for n in gm.graph.nodes]
        with torch.no_grad():
            dense = gm(*example)
        assert linears_from_transposed_weights(gm) == 3
        after = [op_kind(n) for n in gm.graph.nodes]
        assert (kinds.count("matmul"), kinds.count("linear")) == (6, 0)
        assert (after.count("matmul"), after.count("linear")) == (3, 3)  # w4, g g^T, @ x stay
        assert after.count("arith") == kinds.count("arith") - 1          # + b1: the linear's
        assert after.count("transpose") == kinds.count("transpose") - 3  # weight views gone
        with torch.no_grad():
            assert torch.equal(gm(*example)[0], dense[0])
        return sorted(s.weight_name for s in find_linears(gm.graph).values())

    torch.manual_seed(0)
    (names,) = capture_graphs(Products().eval(), (torch.randn(2, 5, 8),), check)
    assert names == ["w1", "w2", "w3", "w4"]


def test_op_kinds_of_elementwise_max_and_weight_transpose():
    g = torch.fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    for n in (a, b):
        n.meta["val"] = torch.empty(2, 3)
    pairwise = g.call_function(torch.max, (a, b))
    reduced = g.call_function(torch.max, (a, -1))
    method = g.call_method("max", (a, b))
    t = g.call_function(getattr, (a, "T"))
    other = g.call_function(getattr, (a, "shape"))
    bmm = g.call_method("baddbmm", (a,), {"batch1": b, "batch2": a, "alpha": 0.5})
    assert [op_kind(n) for n in (pairwise, reduced, method, t, other, bmm)] == [
        "arith", "reduction", "arith", "transpose", "other", "matmul"]
    assert matmul_operands(bmm) == (b, a)


def test_no_blocks_is_an_empty_report():
    _, (s,) = _detect("noblocks")
    assert s.blocks == []
    assert float(s.total_flops) > 0  # the conv is still counted


@pytest.mark.slow
def test_minilm_real_weights():
    sets = capture_graphs(load_minilm(), minilm_inputs(1, 32), lambda gm, _: detect_blocks(gm))
    counts = {k: sum(s.counts()[k] for s in sets) for k in ("ffn", "attention", "residual")}
    assert counts == MINILM_EXPECTED
    ffn = sets[0].ffn[0]
    assert ffn.hidden == 1536 and ffn.up[0].in_features == 384


def test_no_class_names_in_passes():
    """Detection never looks at model class names."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / "dyncompile"
    pattern = re.compile(r"\b(GPT2|Llama|Bert|Roberta|DistilBert|T5|ViT|Mistral|Qwen2)"
                         r"[A-Za-z]*(Model|Block|Layer|MLP|Attention|ForCausalLM)\b")
    hits = [str(p) for p in root.rglob("*.py")
            if "testing" not in p.parts and pattern.search(p.read_text())]
    assert hits == []


@pytest.mark.parametrize("source", [
    "L['self']._modules['model']._modules['fc']._parameters['weight']",
    "L['self'].__self__._modules['model']._modules['fc']._parameters['weight']",
    "L['fn'].__self__.model.fc._parameters['weight']",
])
def test_a_parameter_has_one_name_whatever_the_entry_point(source):
    """``opt(x)`` and ``generate()`` (which holds ``model.forward``, a bound method) trace
    graphs whose sources name a parameter differently; sites keyed on the name must agree."""
    from dyncompile.passes.graph_utils import _source_fqn

    assert _source_fqn(source) == ("param", "model.fc.weight")
