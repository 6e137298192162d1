"""A small byte-level causal LM, trained by the project's own script, and its workload.

Model: a Llama-style causal LM from ``transformers`` (GLU FFN, RoPE, RMSNorm) built from a
``LlamaConfig`` in code: hidden 256, 4 layers, 4 heads, intermediate 688, tied
embeddings, about 3.2M parameters (``quick=True``: a 2-layer, hidden-32 toy).

Tokens are bytes: ids 0..255 are the UTF-8 bytes of the text, ``BOS`` (256)
starts and ``EOS`` (257) ends each document, ``PAD`` (258) fills windows and
batches to a fixed shape and is never a scored target. ``VOCAB`` = 259.

Training text (:func:`training_documents`), in this fixed order:

* the train split of the offline corpus (``corpus.splits(seed).train``), one
  document per sentence;
* docstrings of Python's standard library, extracted with ``ast`` from the
  sorted ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (site-packages,
  test folders and files that fail to parse are skipped; capped at 8 MB).

Nothing held out appears verbatim in it: a train sentence or docstring
paragraph that contains a calibration or evaluation sentence (compared with
whitespace normalized) is dropped. The stdlib differs between Python versions,
so the data fingerprint (and with it the cache key) does too.

Training (:func:`train_lm`): AdamW, linear warm-up then cosine decay, fp32, two
threads, random windows of 129 bytes drawn from a generator seeded by ``seed``,
and a fixed number of steps (never a wall-clock stop, so a seed always gives
the same weights). The result is cached outside git in
``$DYNCOMPILE_CACHE/lm/<key>/`` (default ``~/.cache/dyncompile``) as
``model.safetensors`` + ``config.json`` (``save_pretrained``) + ``train.json``.

The saved config has ``use_cache=False``: a plain forward returns logits and no
KV cache, so ``model(input_ids=x)`` is all the workload ever calls.
:func:`decode_tokens_per_s` asks ``generate`` for the cache explicitly.

Metric: per-byte perplexity on the evaluation split (sentences joined as
``BOS s EOS BOS s EOS ...`` and cut into windows of 128 inputs; every byte is a
target exactly once), compared in :meth:`LMWorkload.info` with an add-one
smoothed unigram byte model fitted on the same training bytes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import corpus
from .workload import Batch, Workload, output_field

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259
MAX_TRAIN_BYTES = 8_000_000
FORMAT_VERSION = 1
THREADS = 2

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# --------------------------------------------------------------------------- tokens


def encode(text: str, bos: bool = True, eos: bool = True) -> torch.Tensor:
    """Byte ids (int64) of ``text``'s UTF-8 encoding, with ``BOS`` / ``EOS`` around it."""
    ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long() \
        if text else torch.empty(0, dtype=torch.long)
    parts = [torch.tensor([BOS])] if bos else []
    parts.append(ids)
    if eos:
        parts.append(torch.tensor([EOS]))
    return torch.cat(parts)


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Text of the byte ids in ``ids`` (special ids dropped, bad UTF-8 replaced)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(i for i in values if 0 <= i < 256).decode("utf-8", errors="replace")


def _stream(texts: Sequence[str]) -> torch.Tensor:
    """``BOS t EOS`` for every text, concatenated (int64)."""
    if not texts:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([encode(t) for t in texts])


# --------------------------------------------------------------------------- data


def _norm(text: str) -> str:
    return " ".join(text.split())


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_DIRS or p.startswith("test_") for p in parts):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def stdlib_docstrings(max_bytes: int = MAX_TRAIN_BYTES) -> tuple[str, ...]:
    """Docstrings (modules, classes, functions) of the standard library, in a fixed order:
    sorted file paths, then ``ast.walk`` order; at most ``max_bytes`` of UTF-8 in all."""
    out: list[str] = []
    total = 0
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or not doc.strip():
                continue
            size = len(doc.encode("utf-8"))
            if total + size > max_bytes:
                return tuple(out)
            out.append(doc)
            total += size
    return tuple(out)


def _held_out(seed: int) -> list[str]:
    s = corpus.splits(seed)
    return [x.text for x in s.calibration + s.evaluation]


def _contains_any(text: str, needles: Sequence[str]) -> bool:
    return any(n in text for n in needles)


@functools.lru_cache(maxsize=4)
def training_documents(seed: int = 0) -> tuple[str, ...]:
    """The training documents for ``seed``: corpus train sentences, then stdlib docstrings,
    with every part that contains a held-out (calibration or evaluation) sentence removed."""
    held = _held_out(seed)
    docs: list[str] = []
    train = [x.text for x in corpus.splits(seed).train]
    docs.extend(t for t in train if not _contains_any(_norm(t), held))
    budget = MAX_TRAIN_BYTES - sum(len(d.encode("utf-8")) for d in docs)
    ds = stdlib_docstrings()
    # Cheap first pass: which held-out sentences occur anywhere in the docstrings at all?
    joined = "\n".join(_norm(p) for d in ds for p in d.split("\n\n"))
    hits = [h for h in held if h in joined]
    for d in ds:
        if hits:
            paras = [p for p in d.split("\n\n") if not _contains_any(_norm(p), hits)]
            d = "\n\n".join(paras)
        if not d.strip():
            continue
        size = len(d.encode("utf-8"))
        if size > budget:
            break
        docs.append(d)
        budget -= size
    return tuple(docs)


@functools.lru_cache(maxsize=4)
def _training_stream(seed: int) -> torch.Tensor:
    return _stream(training_documents(seed))


def data_fingerprint(seed: int = 0) -> str:
    """SHA-256 of the training stream (changes with the Python version's stdlib)."""
    stream = _training_stream(seed)
    return hashlib.sha256(stream.to(torch.int16).numpy().tobytes()).hexdigest()


def _eval_sentences(seed: int, quick: bool) -> list[str]:
    ev = [x.text for x in corpus.splits(seed).evaluation]
    return ev[:32] if quick else ev


def _windows(texts: Sequence[str], seq: int) -> torch.Tensor:
    """``[N, seq + 1]`` windows of the stream of ``texts`` with stride ``seq``: inputs
    ``w[:, :-1]``, targets ``w[:, 1:]``, so every token but the first is a target once.
    The last window is filled with ``PAD``."""
    stream = _stream(texts)
    n = max(1, math.ceil((len(stream) - 1) / seq))
    padded = torch.full((n * seq + 1,), PAD, dtype=torch.long)
    padded[:len(stream)] = stream
    idx = torch.arange(n)[:, None] * seq + torch.arange(seq + 1)[None, :]
    return padded[idx]


def _batched(windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Windows in batches of exactly ``batch`` rows (the last one filled with ``PAD`` rows)."""
    out = []
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        if len(chunk) < batch:
            fill = torch.full((batch - len(chunk), windows.shape[1]), PAD, dtype=torch.long)
            chunk = torch.cat([chunk, fill])
        out.append(chunk)
    return out


# --------------------------------------------------------------------------- model


def lm_config(quick: bool = False) -> Any:
    """The ``LlamaConfig`` of the LM (``quick``: a tiny 2-layer one for tests)."""
    import transformers

    if quick:
        size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2)
    else:
        size = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4)
    return transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=256, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, use_cache=False, **size)


@dataclass(frozen=True)
class TrainSpec:
    """Optimization settings; part of the cache key."""

    steps: int
    batch: int
    seq: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0


# One step of 32x128 took ~0.62 s on 2 idle cores and ~1.3 s with another job on them
# (with GOMP_SPINCOUNT=0, which benchmarks/train_lm.py sets; spinning OpenMP threads
# made it 2-6 s). 600 steps: ~6.5 min idle, ~13 min shared; 2.5M tokens, about 1.3
# passes over the data. The count is fixed: a busy machine trains longer, not less.
FULL_SPEC = TrainSpec(steps=600, batch=32, seq=128, lr=2e-3, warmup=50)
QUICK_SPEC = TrainSpec(steps=30, batch=8, seq=32, lr=3e-3, warmup=5)


def train_spec(quick: bool = False) -> TrainSpec:
    """The training settings for the full or the quick model."""
    return QUICK_SPEC if quick else FULL_SPEC


def _size_kwargs(config: Any) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings")
    out = {k: getattr(config, k) for k in keys}
    out["rope"] = str(getattr(config, "rope_parameters", None) or
                      getattr(config, "rope_theta", None))
    return out


def cache_key(seed: int = 0, quick: bool = False) -> str:
    """Directory name of the cached model: what it is, plus a hash of everything it
    depends on (config, optimizer settings, seed, training data)."""
    blob = json.dumps({"format": FORMAT_VERSION, "config": _size_kwargs(lm_config(quick)),
                       "spec": asdict(train_spec(quick)), "seed": seed, "threads": THREADS,
                       "data": data_fingerprint(seed)}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{'quick' if quick else 'llama3m'}-seed{seed}-{digest}"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$DYNCOMPILE_CACHE``, else ``~/.cache/dyncompile``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DYNCOMPILE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dyncompile"


def model_dir(seed: int = 0, quick: bool = False,
              cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the model for ``seed`` is (or would be) cached: ``<cache>/lm/<key>/``."""
    return cache_root(cache_dir) / "lm" / cache_key(seed, quick)


def n_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * t))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cosine)


def _sample_batches(stream: torch.Tensor, spec: TrainSpec, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(spec.seq + 1)
    for _ in range(spec.steps):
        starts = torch.randint(0, len(stream) - spec.seq - 1, (spec.batch,), generator=g)
        yield stream[starts[:, None] + offsets[None, :]]


def _train(seed: int = 0, quick: bool = False, minutes: float = 12.0,
           progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train the LM from scratch; return the model (eval mode) and its training record."""
    import transformers
    from tqdm import tqdm

    spec = train_spec(quick)
    stream = _training_stream(seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(lm_config(quick)).float()
        model.train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=spec.lr, betas=spec.betas, foreach=True)
        losses: list[float] = []
        bar = tqdm(total=spec.steps, desc="train lm", unit="step", disable=not progress)
        t0 = time.perf_counter()
        warned = False
        for step, xb in enumerate(_sample_batches(stream, spec, seed)):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, spec)
            logits = model(input_ids=xb[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), xb[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step == 19 and not warned and not quick:
                est = (time.perf_counter() - t0) / 20 * spec.steps / 60
                if est > minutes:
                    warned = True
                    print(f"train_lm: {spec.steps} steps will take ~{est:.1f} min here "
                          f"(budget {minutes:.1f} min); the step count stays fixed so the "
                          "weights stay reproducible", file=sys.stderr)
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    model.eval()
    tail = losses[-max(1, min(20, len(losses))):]
    record = {
        "seed": seed, "quick": quick, "spec": asdict(spec), "steps": spec.steps,
        "tokens_seen": spec.steps * spec.batch * spec.seq,
        "final_train_loss": statistics.fmean(tail),
        "final_train_bits_per_byte": statistics.fmean(tail) / math.log(2),
        "first_train_loss": losses[0] if losses else None,
        "train_seconds": seconds, "steps_per_s": spec.steps / seconds if seconds else None,
        "data_bytes": int((stream < 256).sum()), "data_tokens": len(stream),
        "data_documents": len(training_documents(seed)), "data_sha256": data_fingerprint(seed),
        "params": n_params(model), "threads": THREADS, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0],
    }
    return model, record


def train_lm(seed: int = 0, minutes: float = 12.0, quick: bool = False,
             cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Train the LM for ``seed`` and save it under ``<cache>/lm/<key>/``; return that folder.

    Trains a fixed number of steps (``FULL_SPEC`` / ``QUICK_SPEC``): ``minutes`` is only
    the budget a warning compares the projected time against. An existing cached model
    is overwritten atomically (the folder appears complete or not at all).
    """
    final = model_dir(seed, quick, cache_dir)
    model, record = _train(seed, quick, minutes, progress)
    record["key"] = final.name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_lm(seed: int = 0, quick: bool = False, train_if_missing: bool = True,
            cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> nn.Module:
    """The cached LM for ``seed`` (eval mode, fp32); trains it first if it is missing
    and ``train_if_missing`` (else raises ``FileNotFoundError``)."""
    import transformers

    path = model_dir(seed, quick, cache_dir)
    if not (path / "model.safetensors").exists() or not (path / "train.json").exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no cached LM at {path}; run benchmarks/train_lm.py")
        path = train_lm(seed=seed, quick=quick, cache_dir=cache_dir, progress=progress)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def train_record(seed: int = 0, quick: bool = False,
                 cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Contents of the cached model's ``train.json`` (empty if it is not cached)."""
    path = model_dir(seed, quick, cache_dir) / "train.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- metrics


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, ``.logits``, ``["logits"]`` or ``[0]``."""
    return output_field(out, "logits")


def _nll(model: Callable[..., Any], batches: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the byte targets, and their count."""
    total = 0.0
    count = 0
    with torch.no_grad():
        for w in batches:
            x, y = w[:, :-1], w[:, 1:]
            logp = logits_of(model(input_ids=x)).float().log_softmax(-1)
            nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            mask = y < 256
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
    return total, count


def unigram_perplexity(seed: int = 0, quick: bool = False) -> float:
    """Per-byte perplexity of an add-one smoothed unigram byte model fitted on the training
    bytes, on the same evaluation bytes :class:`LMWorkload` scores the LM on."""
    stream = _training_stream(seed)
    counts = torch.bincount(stream[stream < 256], minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    ev = _stream(_eval_sentences(seed, quick))
    ev = ev[ev < 256]
    return math.exp(float(-logp[ev].sum()) / len(ev))


def decode_tokens_per_s(model: nn.Module, prompt_len: int = 32, new_tokens: int = 64,
                        repeats: int = 3, batch: int = 1) -> float:
    """Greedy decoding speed with the KV cache: ``new_tokens`` / median seconds of
    ``model.generate(prompt, do_sample=False, max_new_tokens=new_tokens)`` after one
    warm-up call. ``model`` is the Hugging Face model (it needs ``.generate``)."""
    text = " ".join(_eval_sentences(0, quick=False)[:4])
    prompt = encode(text, eos=False)[:prompt_len]
    ids = prompt.unsqueeze(0).repeat(batch, 1)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return batch * new_tokens / statistics.median(times)


# --------------------------------------------------------------------------- workload


class LMWorkload(Workload):
    """The byte-level Llama LM scored by per-byte perplexity on the evaluation split.

    The model is called as ``model(input_ids=x)`` with ``x`` a ``[B, T]`` LongTensor
    (full: 8x128; quick: 8x32 for evaluation, 2x32 for calibration); outputs are read
    via ``.logits`` (or ``[0]``).
    """

    name = "lm"
    metrics = ("perplexity",)
    higher_is_better = {"perplexity": False, "bits_per_byte": False}

    @property
    def seq(self) -> int:
        return 32 if self.quick else 128

    def build(self) -> nn.Module:
        return load_lm(seed=self.seed, quick=self.quick)

    def _split_windows(self, which: str) -> torch.Tensor:
        s = corpus.splits(self.seed)
        texts = ([x.text for x in s.calibration] if which == "calibration"
                 else _eval_sentences(self.seed, self.quick))
        return _windows(texts, self.seq)

    def calibration(self) -> list[Batch]:
        n, b = (2, 2) if self.quick else (8, 8)
        w = self._split_windows("calibration")
        return [{"input_ids": c[:, :-1].contiguous()} for c in _batched(w, b)[:n]]

    def _eval_batches(self) -> list[torch.Tensor]:
        return _batched(self._split_windows("evaluation"), 8)

    def evaluate(self, model: Callable[..., Any]) -> dict[str, float]:
        total, count = _nll(model, self._eval_batches())
        per_byte = total / count
        return {"perplexity": math.exp(per_byte), "bits_per_byte": per_byte / math.log(2)}

    def timing_inputs(self) -> dict[str, Batch]:
        w = self._split_windows("calibration")[:, :-1]
        if self.quick:
            return {"1x32": {"input_ids": w[:1].contiguous()}}
        return {"1x128": {"input_ids": w[:1].contiguous()},
                "8x128": {"input_ids": w[:8].contiguous()}}

    def info(self) -> dict[str, Any]:
        return {"params": n_params(self.model),
                "unigram_perplexity": unigram_perplexity(self.seed, self.quick),
                "eval_bytes": int((_stream(_eval_sentences(self.seed, self.quick)) < 256).sum()),
                "train": train_record(self.seed, self.quick)}
