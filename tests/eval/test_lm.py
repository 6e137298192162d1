"""The byte-level LM workload: quick training, caching, reproducibility, clean data."""

import json
import math

import pytest
import torch

from dyncompile.eval import corpus, lm


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private DYNCOMPILE_CACHE holding the quick model, trained once for the module."""
    root = tmp_path_factory.mktemp("dyncache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNCOMPILE_CACHE", str(root))
        path = lm.train_lm(seed=0, quick=True, progress=False)
        yield root, path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_encode_decode_roundtrip():
    text = "Bytes: é, ∑ and plain ASCII."
    ids = lm.encode(text)
    assert ids[0] == lm.BOS and ids[-1] == lm.EOS
    assert int(ids.max()) < lm.VOCAB
    assert lm.decode(ids) == text


def test_quick_train_saves_and_loads_back(cache):
    root, path = cache
    assert path.parent == root / "lm"
    assert {"model.safetensors", "config.json", "train.json"} <= {p.name for p in path.iterdir()}
    record = json.loads((path / "train.json").read_text())
    assert record["steps"] == lm.QUICK_SPEC.steps
    assert record["final_train_loss"] < record["first_train_loss"]
    assert record["data_bytes"] > 1_000_000

    loaded = lm.load_lm(seed=0, quick=True, train_if_missing=False, cache_dir=root)
    # Same seed, trained again in memory: identical weights, and the saved copy matches.
    again, _ = lm._train(seed=0, quick=True, progress=False)
    assert _same_weights(loaded, again)
    x = lm.LMWorkload(quick=True).timing_inputs()["1x32"]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, again(input_ids=x).logits)


def test_load_without_cache_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        lm.load_lm(seed=0, quick=True, train_if_missing=False, cache_dir=tmp_path)


def test_workload_evaluate_is_finite_and_repeatable(cache, monkeypatch):
    root, _ = cache
    monkeypatch.setenv("DYNCOMPILE_CACHE", str(root))
    w = lm.LMWorkload(quick=True)
    first = w.evaluate(w.model)
    second = w.evaluate(w.model)
    assert first == second
    assert math.isfinite(first["perplexity"]) and 1.0 < first["perplexity"] < lm.VOCAB
    assert first["bits_per_byte"] == pytest.approx(math.log2(first["perplexity"]))
    cal = w.calibration()
    assert len(cal) == 2 and all(b["input_ids"].shape == (2, 32) for b in cal)
    assert w.timing_inputs()["1x32"]["input_ids"].shape == (1, 32)
    info = w.info()
    assert info["params"] == lm.n_params(w.model)
    assert info["train"]["steps"] == lm.QUICK_SPEC.steps
    assert 1.0 < info["unigram_perplexity"] < 256


def test_scores_every_eval_byte_once():
    texts = [s.text for s in corpus.splits(0).evaluation[:32]]
    windows = lm._windows(texts, 32)
    targets = windows[:, 1:]
    assert int((targets < 256).sum()) == sum(len(t.encode()) for t in texts)


def test_training_text_has_no_held_out_sentence():
    docs = lm.training_documents(0)
    text = " ".join(lm._norm(d) for d in docs)
    splits = corpus.splits(0)
    held = [s.text for s in splits.evaluation + splits.calibration]
    assert not [h for h in held if h in text]
    assert splits.train[-1].text in text  # the corpus train split is used ...
    assert len(text) > 1_000_000  # ... and the stdlib docstrings
