"""Pass manager (graph before/after each pass) and the symbolic cost model."""

import sympy
import torch

import dyncompile
from dyncompile.testing import capture_passes
from dyncompile.testing.zoo import ZOO


def test_pass_manager_snapshots_show_graph_before_and_after():
    entry = ZOO["prenorm"]
    (snaps,) = capture_passes(entry.build(), entry.inputs(2, 6))
    assert [s.after for s in snaps] == ["input", "normalize", "detect"]
    before, after = snaps[0].op_counts, snaps[1].op_counts
    assert before["other"] >= 2 and before["sdpa"] == 0     # two fused MHA calls
    assert after["sdpa"] == 2 and after["linear"] == before["linear"] + 4
    assert "multi_head_attention_forward" in snaps[0].code
    assert "multi_head_attention_forward" not in snaps[1].code
    assert snaps[2].op_counts == snaps[1].op_counts  # detection does not edit the graph


def test_mlp_cost_is_symbolic_and_exact():
    entry = ZOO["mlp"]
    report = dyncompile.inspect(entry.build(), entry.inputs(3, 7))
    B, S = sympy.symbols("B S", positive=True, integer=True)
    (ffn,) = report.blocks
    assert sympy.simplify(ffn.flops - 2 * B * S * (32 * 64 + 64 * 32)) == 0
    assert report.sizes == {"B": 3, "S": 7}
    assert report.share(ffn) == 1.0


def test_attention_cost_counts_core():
    entry = ZOO["encoder-layer-bf"]
    report = dyncompile.inspect(entry.build(), entry.inputs(2, 8))
    (attn,) = [b for b in report.blocks if b.kind == "attention"]
    B, S = sympy.symbols("B S", positive=True, integer=True)
    proj = 2 * B * S * 32 * (96 + 32)
    core = 4 * B * S * S * 32
    assert sympy.simplify(attn.flops - (proj + core)) == 0
    assert abs(sum(report.share(b) for b in report.blocks if b.kind != "residual") - 1.0) < 1e-9


def test_inspect_table_and_empty_report():
    entry = ZOO["noblocks"]
    report = dyncompile.inspect(entry.build(), entry.inputs(1, 9))
    assert report.blocks == [] and "no FFN, attention or residual blocks" in str(report)
    gpt2 = ZOO["gpt2"]
    text = str(dyncompile.inspect(gpt2.build(), gpt2.inputs(2, 8)))
    assert "transformer.h.1.mlp" in text and "2 ffn, 2 attention, 4 residual" in text


def test_inspect_rejects_bad_inputs():
    import pytest

    with pytest.raises(TypeError):
        dyncompile.inspect(lambda x: x, (torch.ones(1),))
    with pytest.raises(TypeError):
        dyncompile.inspect(ZOO["mlp"].build(), 3)


def test_einsum_and_baddbmm_are_counted_as_their_contractions():
    """The attention core costs the same however it is written: einsum, baddbmm onto an
    ALiBi bias (the bias is not an operand), or bmm with a soft cap."""
    B, S = sympy.symbols("B S", positive=True, integer=True)
    totals = {}
    for name in ("attn-einsum", "attn-alibi", "attn-softcap"):
        entry = ZOO[name]
        report = dyncompile.inspect(entry.build(), entry.inputs(2, 6))
        totals[name] = sympy.expand(report.total_flops)
        cores = [b for b in report.blocks if b.kind == "attention"]
        assert len(cores) == 2 and all(len(b.core) == 3 for b in cores)
    # 2 layers x 2 products x 2 * B * heads(4) * S * S * head_dim(8), plus the linears
    core = 2 * 2 * 2 * B * 4 * S * S * 8
    linears = 2 * (4 * 2 * B * S * 32 * 32 + 2 * 2 * B * S * 32 * 64)
    for name, total in totals.items():
        assert sympy.simplify(total - (core + linears)) == 0, (name, total)
