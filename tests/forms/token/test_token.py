"""Form ``token``: the cut (pieces, merge points and biased attentions counted), budget
1.0 = dense, tokens per block falling with the budget, unmerge restoring the output's
shape with padding kept apart, causal models left dense, the schedule, no recompile."""

import pytest
import torch
import transformers

import dyncompile
from dyncompile.core.budget import BudgetState
from dyncompile.forms.token.rewrite import TokenForm, is_causal
from dyncompile.forms.token.schedule import keep_ratio, spent, token_counts
from dyncompile.module import call_batch
from dyncompile.passes.base import PassContext
from dyncompile.passes.detect import detect_blocks
from dyncompile.testing import assert_matches_dense, assert_no_recompile, compare_outputs
from dyncompile.testing.zoo import ZOO
from tests.conftest import capture_graphs

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_hidden_layers=4, vocab_size=99, max_position_embeddings=64)


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**SMALL)).eval()


def _ids(batch, seq, seed=0, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        ids[-1, pad_from:] = 0
        mask[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _opt(model, **kw):
    return dyncompile.optimize(model, methods=["token"], compiler="eager", **kw)


def _graph(opt):
    return opt.state.forms["token"].graphs[0]


def test_cut_counts_pieces_merges_and_biased_attention():
    model, x = _bert(), _ids(2, 24)
    opt = _opt(model)
    with torch.no_grad():
        opt(**x)
    g = _graph(opt)
    layers = SMALL["num_hidden_layers"]
    assert len(g.pieces) == 2 * layers  # one piece per residual block
    assert sum(k is not None for k in g.keys) == layers  # a merge after each attention
    assert g.keys[0] is not None and g.keys[1] is None
    for j, p in enumerate(g.pieces):
        sdpa = [n for n in p.module.graph.nodes if "scaled_dot_product" in str(n.target)]
        bias = [n for n in p.module.graph.nodes if n.op == "placeholder" and
                n.name == "token_bias"]
        assert len(sdpa) == (1 if j % 2 == 0 else 0)
        assert len(bias) == len(sdpa) and g.biased[j] == bool(sdpa)
        for n in sdpa:  # the mask the attention reads is the model's mask plus the bias
            mask = n.kwargs["attn_mask"]
            assert mask.target.__name__ == "add" and bias[0] in mask.args
    # the whole graph is kept unbiased for budget 1.0
    assert not [n for n in g.whole.module.graph.nodes if n.name == "token_bias"]
    assert opt.report() and "merge after block 0" in str(opt.report())


def test_budget_one_equals_dense_and_tokens_fall_with_the_budget():
    model, x = _bert(), _ids(3, 40, pad_from=25)
    opt = _opt(model)
    assert_matches_dense(model, opt, x)
    seen, spent_at = [], []
    for b in (0.8, 0.6, 0.4):
        with torch.no_grad(), dyncompile.budget(b):
            out = opt(**x)
        tokens = list(opt.state.forms["token"].last_tokens)
        assert tokens[0] == 40 and tokens == sorted(tokens, reverse=True)
        assert out.last_hidden_state.shape == (3, 40, SMALL["hidden_size"])
        seen.append(sum(tokens))
        spent_at.append(opt.stats.fraction)
        assert opt.stats.ratio("tokens") == pytest.approx(sum(tokens) / (40 * len(tokens)))
    assert seen[0] > seen[1] > seen[2]
    assert spent_at[0] > spent_at[1] > spent_at[2]
    assert spent_at[0] == pytest.approx(0.8, abs=0.05)


def test_unmerge_keeps_padding_apart_and_real_tokens_blind_to_it():
    model = _bert()
    x = _ids(2, 32, pad_from=20)
    opt = _opt(model)
    with torch.no_grad(), dyncompile.budget(0.4):
        a = opt(**x).last_hidden_state
        rt = opt.state.forms["token"]
        index, rep = rt.last_index, rt.last_rep
        y = {k: v.clone() for k, v in x.items()}
        y["input_ids"][-1, 20:] = 7  # other padding ids: the real tokens cannot tell
        b = opt(**y).last_hidden_state
    assert rep.shape[1] < 32
    # each original token's final position holds a kept token of its own kind
    pad = x["attention_mask"] == 0
    assert torch.equal(pad.gather(1, rep).gather(1, index), pad)
    assert index[0, 0] == 0 and rep[0, 0] == 0  # the first token is kept, in place
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


def test_merged_tokens_share_a_row_and_quality_degrades_gracefully():
    model, x = _bert(), _ids(2, 48)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    opt = _opt(model)
    with torch.no_grad(), dyncompile.budget(0.6):
        out = opt(**x).last_hidden_state
    index = opt.state.forms["token"].last_index
    # tokens of one group carry the same output row
    for i in range(2):
        for slot in index[i].unique():
            rows = out[i, index[i] == slot]
            assert torch.equal(rows, rows[:1].expand_as(rows))
    pooled = torch.nn.functional.cosine_similarity(out.mean(1), ref.mean(1))
    assert (pooled > 0.9).all()


@pytest.mark.parametrize("name", ["roberta", "distilbert", "prenorm"])
def test_other_encoders_merge_and_equal_dense_at_one(name):
    spec = ZOO[name]
    model = spec.build().eval()
    x = spec.inputs(2, 16)
    opt = _opt(model)
    assert_matches_dense(model, opt, x)
    with torch.no_grad(), dyncompile.budget(0.5):
        out = call_batch(opt, x)
    tokens = opt.state.forms["token"].last_tokens
    assert tokens[-1] < tokens[0]
    with torch.no_grad():
        ref = call_batch(model, x)
    compare_outputs(out, ref, atol=1e9, rtol=1e9)  # same structure and shapes


def test_causal_models_are_left_dense():
    spec = ZOO["gpt2"]
    model = spec.build().eval()
    cfg = dyncompile.DynConfig(methods=("token",))

    def plan(gm, example):
        ctx = PassContext(config=cfg, example_inputs=example, state=BudgetState())
        ctx.blocks = detect_blocks(gm)
        return TokenForm(cfg).plan(gm, ctx)

    why = capture_graphs(model, spec.inputs(2, 12), plan)[0]
    assert isinstance(why, str) and "causal attention" in why
    opt = _opt(model)
    with torch.no_grad(), dyncompile.budget(0.5):
        assert_matches_dense(model, opt, spec.inputs(2, 12))
    assert not opt.state.forms.get("token") or not opt.state.forms["token"].graphs


def test_is_causal_reads_the_graph():
    enc = capture_graphs(_bert(), _ids(1, 8))[0]
    spec = ZOO["gpt2"]
    dec = capture_graphs(spec.build().eval(), spec.inputs(1, 8))[0]
    assert not is_causal(enc) and is_causal(dec)


def test_schedule_meets_the_budget_and_floors_at_half():
    merge_after = [True, False] * 6
    linear = [4.0, 8.0] * 6
    quad = [0.5, 0.0] * 6
    dense = spent(128, [128] * 12, linear, quad, 1.0)
    assert keep_ratio(1.0, 128, merge_after, linear, quad, 1.0) == 1.0
    last = 1.0
    for b in (0.9, 0.7, 0.5, 0.3):
        r = keep_ratio(b, 128, merge_after, linear, quad, 1.0)
        counts = token_counts(128, r, merge_after)
        assert r <= last and counts == sorted(counts, reverse=True)
        cost = spent(128, counts, linear, quad, 1.0) / dense
        assert cost == pytest.approx(b, abs=0.02) or r == 0.5
        last = r
    assert keep_ratio(0.01, 128, merge_after, linear, quad, 1.0) == 0.5
    # no merge point merges more than bipartite matching can
    counts = token_counts(9, 0.5, merge_after)
    assert all(b >= a // 2 + 1 for a, b in zip(counts[::2], counts[1::2]))


def test_matching_on_keys_reads_the_key_projection():
    model, x = _bert(), _ids(2, 24)
    opt = _opt(model, form_options={"token": {"match_on": "keys"}})
    with torch.no_grad(), dyncompile.budget(0.5):
        opt(**x)
    g = _graph(opt)
    merges = [(j, k) for j, k in enumerate(g.keys) if k is not None]
    assert merges and all(k is not g.stream[j + 1] for j, k in merges)
    assert all("linear" in str(k.target) for _, k in merges)
    assert opt.state.forms["token"].last_tokens[-1] < 24
    # the default matches on the stream leaving the attention block
    opt = _opt(model)
    with torch.no_grad():
        opt(**x)
    g = _graph(opt)
    assert all(k is g.stream[j + 1] for j, k in enumerate(g.keys) if k is not None)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="protect_first"):
        _opt(_bert(), form_options={"token": {"protect_first": "yes"}})


def test_no_recompile_across_budgets_and_token_counts_under_inductor():
    model = _bert()
    x = _ids(2, 32, pad_from=21)
    opt = dyncompile.optimize(model, methods=["token"])
    assert_matches_dense(model, opt, x)
    warm = assert_no_recompile(opt, x)
    assert warm == 0  # compiled once, at the first call above
    with torch.no_grad():
        eager = _opt(model)
        for b in (0.7, 0.4):
            with dyncompile.budget(b):
                got, want = opt(**x), eager(**x)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state,
                                       atol=1e-4, rtol=1e-4)
    # another token count runs through the same compiled pieces
    y = _ids(3, 19)
    assert_no_recompile(opt, y, budgets=(1.0, 0.5))
