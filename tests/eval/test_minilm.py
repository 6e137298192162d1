"""MiniLM workloads: embeddings match sentence-transformers, metrics can pass and fail."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from dyncompile.eval import corpus, minilm
from dyncompile.eval.minilm import ClassifierWorkload, EmbeddingWorkload, embed
from dyncompile.testing import zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point DYNCOMPILE_CACHE at a temporary folder for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNCOMPILE_CACHE", str(tmp_path_factory.mktemp("dyncache")))
        yield


@pytest.fixture(scope="module")
def emb(cache_dir: None) -> EmbeddingWorkload:
    return EmbeddingWorkload(quick=True)


@pytest.fixture(scope="module")
def clf(cache_dir: None) -> ClassifierWorkload:
    return ClassifierWorkload(quick=True)


def test_embed_matches_sentence_transformers(emb: EmbeddingWorkload) -> None:
    st = pytest.importorskip("sentence_transformers")
    texts = [s.text for s in corpus.splits(0).evaluation[:8]]
    ours = embed(emb.model, emb.tokenizer, texts, batch_size=4)
    ref = st.SentenceTransformer(zoo.minilm_path(), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_tensor=True)
    assert ours.shape == (8, 384)
    torch.testing.assert_close(ours, ref.cpu().float(), atol=1e-5, rtol=0)


def test_dense_scores_itself_exactly(emb: EmbeddingWorkload) -> None:
    assert emb.evaluate(emb.model) == {"cosine": 1.0, "retrieval_top1": 1.0}
    info = emb.info()
    assert info["eval_size"] == 32 and info["params"] > 20_000_000


def test_perturbed_model_scores_below_one(emb: EmbeddingWorkload) -> None:
    bad = copy.deepcopy(emb.model)
    with torch.no_grad():
        bad.encoder.layer[2].output.dense.weight.mul_(1.5)
    scores = emb.evaluate(bad)
    assert scores["cosine"] < 0.9999
    assert 0.0 <= scores["retrieval_top1"] <= 1.0


def test_classifier_beats_majority_and_is_deterministic(clf: ClassifierWorkload) -> None:
    first = clf.evaluate(clf.model)
    again = clf.evaluate(clf.model)
    assert first == again
    assert first["agreement"] == 1.0
    info = clf.info()
    assert len(info["labels"]) == 8 and info["eval_size"] == 64
    assert info["dense_accuracy"] == first["accuracy"]
    assert first["accuracy"] > info["majority_baseline"] + 0.1, info
    assert "warning" not in info
    assert clf.cache_path().exists()
    # a fresh instance loads the cached head instead of fitting a new one
    fresh = ClassifierWorkload(quick=True)
    assert fresh.cache_path() == clf.cache_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(minilm, "embed", lambda *a, **k: pytest.fail("refitted instead of loading"))
        head = fresh._head(clf.model.encoder)
    torch.testing.assert_close(head.state_dict(), clf.model.head.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize("make", [EmbeddingWorkload, ClassifierWorkload])
def test_timing_and_calibration_shapes(make: type, cache_dir: None) -> None:
    w = make(quick=True)
    shapes = {label: {k: tuple(v.shape) for k, v in batch.items()}
              for label, batch in w.timing_inputs().items()}
    assert set(shapes) == {"1x32", "4x32"}
    for label, batch in w.timing_inputs().items():
        b, n = (int(x) for x in label.split("x"))
        assert shapes[label]["input_ids"] == (b, n)
        assert bool((batch["attention_mask"] == 1).all())
        assert bool((batch["input_ids"][:, 0] == w.tokenizer.cls_token_id).all())
        assert bool((batch["input_ids"][:, -1] == w.tokenizer.sep_token_id).all())
    cal = w.calibration()
    assert len(cal) == 2 and all(c["input_ids"].shape[0] == 4 for c in cal)


def test_full_timing_shapes(cache_dir: None) -> None:
    w = EmbeddingWorkload(quick=False)
    shapes = {k: tuple(v["input_ids"].shape) for k, v in w.timing_inputs().items()}
    assert shapes == {"1x128": (1, 128), "32x128": (32, 128)}
