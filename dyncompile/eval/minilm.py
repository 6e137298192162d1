"""MiniLM workloads: sentence embeddings and a topic classifier on top of them.

Both use the real all-MiniLM-L6-v2 weights (``dyncompile.testing.zoo.load_minilm``)
and the offline pydoc corpus (``dyncompile.eval.corpus``).

``EmbeddingWorkload`` ("minilm") scores a model by how close its sentence
embeddings stay to the dense model's:

* ``cosine``: mean cosine similarity between the evaluated and the dense
  embeddings of the evaluation sentences;
* ``retrieval_top1``: a real retrieval task on the evaluation split. Each query
  is the first half of a sentence's words; the documents are the full
  sentences. The metric is the fraction of queries whose top-1 document (by
  cosine) under the evaluated model is the same as under the dense model.

``ClassifierWorkload`` ("classifier") puts a logistic-regression head (fitted
once on dense embeddings of the train split, cached on disk) on the pooled,
normalized embedding and predicts which of the 8 largest pydoc topics a
sentence comes from. Metrics: ``accuracy`` and ``agreement`` with the dense
model's predictions.

Embeddings are computed exactly as sentence-transformers does for this model
(tokenize with padding to the longest sequence of the batch and truncation,
mean pooling over the attention mask, L2 normalization), except that
sequences are truncated at 128 tokens instead of 256 (the corpus's longest
sentence has 100 tokens, so nothing is cut).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import corpus
from .workload import Batch, Workload, output_field

MAX_LENGTH = 128
N_TOPICS = 8


# --------------------------------------------------------------------------- helpers


def load_tokenizer() -> Any:
    """The tokenizer shipped in the MiniLM model folder (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from ..testing import zoo

    return transformers.AutoTokenizer.from_pretrained(zoo.minilm_path())


def tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token tensors for ``texts``: padded to the longest in the batch, truncated at 128."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    return {k: v for k, v in enc.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}


def hidden_states(out: Any) -> torch.Tensor:
    """Token embeddings from a model output: ``.last_hidden_state``, ``[0]`` or a tensor."""
    return output_field(out, "last_hidden_state")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalized mean of the token embeddings under the attention mask
    (sentence-transformers' Pooling(mean) followed by Normalize)."""
    mask = attention_mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
    summed = torch.sum(hidden * mask, 1)
    counts = torch.clamp(mask.sum(1), min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


def embed(model_callable: Callable[..., Any], tokenizer: Any, texts: Sequence[str],
          batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[N, 384]`` (float32, L2-normalized) of ``texts``.

    ``model_callable`` is called like the Hugging Face BERT encoder (keyword
    ``input_ids``, ``attention_mask`` and ``token_type_ids`` when the tokenizer
    produces them); it may be a dyncompile ``DynModule`` wrapping the model.
    """
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, texts[i:i + batch_size])
            hidden = hidden_states(model_callable(**batch))
            chunks.append(mean_pool(hidden.float(), batch["attention_mask"]))
    if not chunks:
        return torch.empty(0, 384)
    return torch.cat(chunks).float()


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity; identical rows count as exactly 1.0."""
    a64, b64 = a.double(), b.double()
    cos = F.cosine_similarity(a64, b64, dim=1).clamp(-1.0, 1.0)
    same = (a == b).all(dim=1)
    cos = torch.where(same, torch.ones_like(cos), cos)
    return float(cos.mean())


def _exact_length_batch(tokenizer: Any, texts: Sequence[str], batch: int,
                        length: int) -> dict[str, torch.Tensor]:
    """``batch`` rows of exactly ``length`` tokens ([CLS] text... [SEP]) cut from a running
    stream of real corpus text; attention mask all ones."""
    body = length - 2
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(stream) >= body * batch:
            break
    while len(stream) < body * batch:  # tiny corpora: repeat
        stream = stream + stream
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [[cls, *stream[r * body:(r + 1) * body], sep] for r in range(batch)]
    ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}


def _cache_root() -> Path:
    env = os.environ.get("DYNCOMPILE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dyncompile"


def _weights_fingerprint() -> dict[str, Any]:
    """Size, mtime and sha256 of the first MiB of the MiniLM weights file."""
    from ..testing import zoo

    folder = Path(zoo.minilm_path())
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return {"folder": str(folder)}
    f = files[0]
    st = f.stat()
    with f.open("rb") as fh:
        head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
    return {"file": f.name, "size": st.st_size, "mtime": int(st.st_mtime), "sha1mb": head}


def top_topics(n: int = N_TOPICS) -> list[str]:
    """The ``n`` pydoc topics with the most sentences (ties broken by name), sorted by name."""
    counts = collections.Counter(s.doc for s in corpus.sentences())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted(name for name, _ in ranked[:n])


# --------------------------------------------------------------------------- workloads


class _MiniLMWorkload(Workload):
    """Shared pieces: tokenizer, splits, calibration and timing batches."""

    def __init__(self, quick: bool = False, seed: int = 0) -> None:
        super().__init__(quick=quick, seed=seed)
        self._tokenizer: Any = None
        self._splits: corpus.Splits | None = None

    @property
    def tokenizer(self) -> Any:
        """The model folder's tokenizer, loaded once."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()
        return self._tokenizer

    @property
    def splits(self) -> corpus.Splits:
        """Calibration / evaluation / train splits for this seed."""
        if self._splits is None:
            self._splits = corpus.splits(self.seed)
        return self._splits

    def calibration(self) -> list[Batch]:
        """8 batches of 32 calibration sentences (quick: 2 of 4), as kwargs dicts."""
        n_batches, size = (2, 4) if self.quick else (8, 32)
        texts = [s.text for s in self.splits.calibration]
        return [tokenize(self.tokenizer, texts[i * size:(i + 1) * size])
                for i in range(n_batches)]

    def timing_inputs(self) -> dict[str, Batch]:
        """{"1x128", "32x128"} (quick: {"1x32", "4x32"}) of real text, no padding."""
        shapes = [(1, 32), (4, 32)] if self.quick else [(1, 128), (32, 128)]
        texts = [s.text for s in self.splits.calibration]
        return {f"{b}x{n}": _exact_length_batch(self.tokenizer, texts, b, n) for b, n in shapes}


class EmbeddingWorkload(_MiniLMWorkload):
    """all-MiniLM-L6-v2 as a sentence-embedding model (see the module docstring)."""

    name = "minilm"
    metrics = ("cosine", "retrieval_top1")
    higher_is_better = {"cosine": True, "retrieval_top1": True}

    def __init__(self, quick: bool = False, seed: int = 0) -> None:
        super().__init__(quick=quick, seed=seed)
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None

    def build(self) -> nn.Module:
        """The real MiniLM encoder (BERT, 6 layers)."""
        from ..testing import zoo

        return zoo.load_minilm()

    def eval_texts(self) -> list[str]:
        """Evaluation sentences: all 512 of the split (quick: the first 32)."""
        ev = self.splits.evaluation[:32] if self.quick else self.splits.evaluation
        return [s.text for s in ev]

    def queries(self) -> list[str]:
        """Retrieval queries: the first half of each evaluation sentence's words."""
        out = []
        for text in self.eval_texts():
            words = text.split()
            out.append(" ".join(words[:max(1, len(words) // 2)]))
        return out

    def _embed_all(self, model: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
        docs = embed(model, self.tokenizer, self.eval_texts())
        queries = embed(model, self.tokenizer, self.queries())
        return docs, queries

    def dense_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(documents, queries) embeddings of the dense model, computed once."""
        if self._dense is None:
            self._dense = self._embed_all(self.model)
        return self._dense

    @staticmethod
    def _top1(docs: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return (queries @ docs.T).argmax(dim=1)

    def evaluate(self, model: Callable[..., Any]) -> dict[str, float]:
        """Cosine to the dense embeddings and top-1 retrieval agreement with dense."""
        ref_docs, ref_q = self.dense_embeddings()
        docs, queries = self._embed_all(model)
        agree = (self._top1(docs, queries) == self._top1(ref_docs, ref_q)).double().mean()
        return {"cosine": _mean_cosine(docs, ref_docs), "retrieval_top1": float(agree)}

    def info(self) -> dict[str, Any]:
        """Parameter count, evaluation size and the dense model's own retrieval accuracy."""
        ref_docs, ref_q = self.dense_embeddings()
        hits = self._top1(ref_docs, ref_q) == torch.arange(len(ref_q))
        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "eval_size": len(self.eval_texts()),
            "retrieval": "query = first half of a sentence's words; documents = full "
                         "eval sentences; metric = top-1 equal to the dense model's",
            "dense_retrieval_accuracy": float(hits.double().mean()),
        }


class EmbeddingClassifier(nn.Module):
    """Encoder + mean pooling + L2 normalization + linear head -> logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids,
                                           "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = hidden_states(self.encoder(**kwargs))
        return self.head(mean_pool(hidden, attention_mask))


def fit_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int = 0,
             weight_decay: float = 1e-4, steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression on features ``x`` (full-batch LBFGS, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=g))
        head.bias.zero_()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.eval()


class ClassifierWorkload(_MiniLMWorkload):
    """Topic classifier: MiniLM embedding + a fitted linear head (see the module docstring).

    Evaluation: the evaluation-split sentences of the 8 topics (quick: the first 64
    of them; the quick embedding split of 32 sentences holds too few to compare
    against the majority baseline). The head is fitted on all train-split sentences
    of the 8 topics (quick: the first 256).
    """

    name = "classifier"
    metrics = ("accuracy", "agreement")
    higher_is_better = {"accuracy": True, "agreement": True}
    quality = "top1"  # the model returns a bare logits tensor

    def __init__(self, quick: bool = False, seed: int = 0) -> None:
        super().__init__(quick=quick, seed=seed)
        self.labels = top_topics()
        self._index = {name: i for i, name in enumerate(self.labels)}
        self._dense_pred: torch.Tensor | None = None
        self._fit_info: dict[str, Any] = {}

    def _subset(self, items: list[corpus.Sentence], limit: int | None) -> list[corpus.Sentence]:
        kept = [s for s in items if s.doc in self._index]
        return kept[:limit] if limit is not None else kept

    def train_items(self) -> list[corpus.Sentence]:
        """Train-split sentences of the 8 topics (quick: the first 256)."""
        return self._subset(self.splits.train, 256 if self.quick else None)

    def eval_items(self) -> list[corpus.Sentence]:
        """Evaluation-split sentences of the 8 topics (quick: the first 64)."""
        return self._subset(self.splits.evaluation, 64 if self.quick else None)

    def eval_labels(self) -> torch.Tensor:
        """Topic indices of the evaluation sentences."""
        return torch.tensor([self._index[s.doc] for s in self.eval_items()])

    def cache_path(self) -> Path:
        """``$DYNCOMPILE_CACHE/classifier/<key>.pt``; the key hashes what the head depends on."""
        spec = {"seed": self.seed, "labels": self.labels, "n_train": len(self.train_items()),
                "weights": _weights_fingerprint(), "version": 1}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        return _cache_root() / "classifier" / f"{key}.pt"

    def _head(self, encoder: nn.Module) -> nn.Linear:
        path = self.cache_path()
        head = nn.Linear(384, len(self.labels))
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                head.load_state_dict(saved["state_dict"])
                self._fit_info = dict(saved.get("info", {}))
                return head.eval()
            except Exception:  # corrupt or stale cache entry: refit
                pass
        items = self.train_items()
        x = embed(encoder, self.tokenizer, [s.text for s in items])
        y = torch.tensor([self._index[s.doc] for s in items])
        torch.manual_seed(self.seed)
        head = fit_head(x, y, len(self.labels), seed=self.seed)
        with torch.no_grad():
            train_acc = float((head(x).argmax(1) == y).double().mean())
        counts = torch.bincount(y, minlength=len(self.labels))
        self._fit_info = {"n_train": len(items), "train_accuracy": train_acc,
                          "majority_label": self.labels[int(counts.argmax())]}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": head.state_dict(), "info": self._fit_info,
                    "labels": self.labels}, tmp)
        os.replace(tmp, path)
        return head.eval()

    def build(self) -> nn.Module:
        """``EmbeddingClassifier`` on the real MiniLM with the fitted (or cached) head."""
        from ..testing import zoo

        encoder = zoo.load_minilm()
        return EmbeddingClassifier(encoder, self._head(encoder))

    def predict(self, model: Callable[..., Any], batch_size: int = 32) -> torch.Tensor:
        """Predicted topic indices of the evaluation sentences under ``model`` (called like
        ``EmbeddingClassifier``: input_ids, attention_mask, token_type_ids -> logits)."""
        texts = [s.text for s in self.eval_items()]
        preds: list[torch.Tensor] = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                logits = model(**tokenize(self.tokenizer, texts[i:i + batch_size]))
                if not isinstance(logits, torch.Tensor):
                    logits = logits[0]
                preds.append(logits.argmax(dim=-1))
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    def dense_predictions(self) -> torch.Tensor:
        """The dense model's predictions on the evaluation sentences, computed once."""
        if self._dense_pred is None:
            self._dense_pred = self.predict(self.model)
        return self._dense_pred

    def evaluate(self, model: Callable[..., Any]) -> dict[str, float]:
        """Accuracy on the 8-topic evaluation sentences and agreement with dense."""
        ref = self.dense_predictions()
        pred = self.predict(model)
        return {"accuracy": float((pred == self.eval_labels()).double().mean()),
                "agreement": float((pred == ref).double().mean())}

    def majority_baseline(self) -> float:
        """Accuracy on the evaluation sentences of always predicting the train majority topic."""
        counts = collections.Counter(s.doc for s in self.train_items())
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        return float((self.eval_labels() == self._index[top]).double().mean())

    def info(self) -> dict[str, Any]:
        """Labels, sizes, dense accuracy and the majority-class baseline."""
        model = self.model  # fits or loads the head
        dense_acc = float((self.dense_predictions() == self.eval_labels()).double().mean())
        baseline = self.majority_baseline()
        out: dict[str, Any] = {
            "params": sum(p.numel() for p in model.parameters()),
            "labels": self.labels,
            "eval_size": len(self.eval_items()),
            "train_size": len(self.train_items()),
            "dense_accuracy": dense_acc,
            "majority_baseline": baseline,
            **{k: v for k, v in self._fit_info.items() if k not in ("n_train",)},
        }
        if dense_acc <= baseline + 0.1:
            out["warning"] = "the head does not clearly beat the majority-class baseline"
        return out
