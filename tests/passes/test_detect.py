"""Detection finds the right blocks, with the right counts, on every architecture."""

import pytest
import torch

from dyncompile.passes.detect import detect_blocks
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
