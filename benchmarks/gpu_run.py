"""Everything dyncompile checks and measures on a CUDA GPU, as one script.

Sections (each guarded: a failure is recorded with its traceback and the next
section runs; each is skipped when the time left is too short for it):

- ``pytest``: the GPU tests (``-m cuda``: the Triton kernels against their
  references on the device);
- ``kernels``: sparse_linear's kernel (the gated form's Triton split-K
  sparse GEMV) against cuBLAS ``F.linear`` at Llama-7B shapes in fp16, and
  ``dyncompile::expert_ffn`` (Triton) against the dense FFN; rounds of CUDA-event
  timings interleaved, weights rotated among copies larger than L2 together,
  median of rounds;
- ``early_exit``: MiniLM and the MiniLM classifier (weights and batches from
  ``benchmarks/gpu_bundle.py``) on the GPU, dyncompile early exit against the
  dense model under the default ``torch.compile``, timed interleaved as on the
  CPU (``benchmarks/early_exit_speed.py``: budget 1.0, every exit checked with
  none leaving, pieces with no check, budgets 0.8 / 0.6 / 0.4), with the quality
  at each budget (cosine to dense embeddings; accuracy and agreement);
- ``forms``: the gated and expert forms end to end on MiniLM.

    python benchmarks/gpu_run.py --bundle .gpu/bundle.pt --out DIR
        [--sections pytest,kernels,early_exit,forms] [--deadline 480]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

START = time.time()
RESULTS: dict[str, Any] = {}
DEV = "cuda"  # --device cpu: a dry run of the model sections on a machine without a GPU
OUT_DIR = Path(".gpu/out")
DEADLINE = 480.0


def save() -> None:
    """Write what has been measured so far (a run cut short keeps its rows)."""
    (OUT_DIR / "gpu_run.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def time_left() -> float:
    return DEADLINE - (time.time() - START)


def log(*a: Any) -> None:
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------ timing


def event_samples(fns: dict[str, Any], rounds: int = 30, inner: int = 10,
                  warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, per round: CUDA events around ``inner``
    back-to-back calls, functions interleaved with the order rotating each round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    torch.cuda.synchronize()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fns[n]()
            b.record()
            b.synchronize()
            out[n].append(a.elapsed_time(b) / 1e3 / inner)
    return out


class Rotating:
    """Calls ``fn(w)`` with the next of ``weights`` each time: copies that together
    outgrow L2, so a timed call reads its weight from device memory."""

    def __init__(self, fn: Any, weights: list[torch.Tensor]) -> None:
        self.fn, self.weights, self.i = fn, weights, 0

    def __call__(self) -> Any:
        self.i = (self.i + 1) % len(self.weights)
        return self.fn(self.weights[self.i])


def med(v: list[float]) -> float:
    return statistics.median(v)


# ------------------------------------------------------------------ sections


def section_pytest(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/ops", "-p",
           "no:cacheprovider", "-x", "-rs"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    (out / "pytest_cuda.log").write_text(p.stdout + p.stderr)
    log(p.stdout[-1500:])
    return {"rc": p.returncode, "tail": p.stdout[-800:]}


LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096)]


def section_kernels(out: Path, rounds: int) -> dict[str, Any]:
    import dyncompile.forms.expert.ops  # noqa: F401
    from dyncompile.ops.expert_ffn.reference import expert_ffn_reference
    from dyncompile.ops.sparse_linear.kernels import run_cuda
    from dyncompile.ops.sparse_linear.reference import sparse_linear_reference

    dev = "cuda"
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []

    def sp(x, wt, b, thr):  # the Triton kernel as the gated form's op runs it
        return run_cuda(x, wt, b, float(thr), count=False)[0]

    for n_in, n_out in LLAMA:
        copies = max(2, int(160e6 // (n_in * n_out * 2)) + 1)  # > L2 together
        ws = [torch.randn(n_out, n_in, device=dev, dtype=torch.float16) / n_in ** 0.5
              for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        b = torch.randn(n_out, device=dev, dtype=torch.float16)
        for tokens in (1, 4, 16):
            x = torch.randn(tokens, n_in, device=dev, dtype=torch.float16)
            for s in (0.0, 0.25, 0.4, 0.5, 0.75, 0.9):
                thr = torch.tensor(float(x.abs().float().flatten().quantile(s)) if s else 0.0)
                ref = sparse_linear_reference(x.float(), wts[0].float(), b.float(), thr)
                got = sp(x, wts[0], b, thr).float()
                err = float((got - ref).norm() / ref.norm())
                dense = Rotating(lambda w, x=x, b=b: F.linear(x, w, b), ws)
                sparse = Rotating(lambda wt, x=x, b=b, t=thr: sp(x, wt, b, t), wts)
                sm = event_samples({"dense": dense, "sparse": sparse}, rounds=rounds)
                d, t = med(sm["dense"]), med(sm["sparse"])
                union = float((x.abs() >= thr).any(0).float().mean())
                rows.append({"in": n_in, "out": n_out, "tokens": tokens, "sparsity": s,
                             "union_active": union, "rel_err": err, "dense_us": 1e6 * d,
                             "sparse_us": 1e6 * t, "speedup": d / t,
                             "ideal": 1 / max(union, 1e-9)})
                log("sparse_linear", rows[-1])
    ffn_rows: list[dict[str, Any]] = []
    ex = torch.ops.dyncompile.expert_ffn
    for d_model, hidden, experts in ((768, 3072, 32), (4096, 11008, 43)):
        for dtype in (torch.float16,):
            wu = torch.randn(hidden, d_model, device=dev, dtype=dtype) / d_model ** 0.5
            bu = torch.randn(hidden, device=dev, dtype=dtype)
            wd = torch.randn(d_model, hidden, device=dev, dtype=dtype) / hidden ** 0.5
            wdt = wd.t().contiguous()
            bd = torch.randn(d_model, device=dev, dtype=dtype)
            for n in (1, 128, 4096):
                x = torch.randn(n, d_model, device=dev, dtype=dtype)
                for keep in (0.25, 0.5, 0.75, 1.0):
                    k = round(keep * experts)
                    m = (torch.rand(n, experts, device=dev).argsort(1) < k)
                    args = (x, wu, bu, None, None, wdt, bd, m, "gelu")
                    ref = expert_ffn_reference(*[a.float() if isinstance(a, torch.Tensor)
                                                 and a.is_floating_point() else a
                                                 for a in args])
                    got = ex(*args).float()
                    err = float((got - ref).norm() / ref.norm())
                    sm = event_samples({
                        "dense": lambda x=x, w=(wu, bu, wd, bd): F.linear(
                            F.gelu(F.linear(x, w[0], w[1])), w[2], w[3]),
                        "expert": lambda args=args: ex(*args)},
                        rounds=max(8, rounds // 2), inner=5)
                    dd, t = med(sm["dense"]), med(sm["expert"])
                    ffn_rows.append({"d": d_model, "h": hidden, "experts": experts,
                                     "tokens": n, "keep": keep, "dtype": str(dtype),
                                     "rel_err": err, "dense_us": 1e6 * dd,
                                     "expert_us": 1e6 * t, "speedup": dd / t})
                    log("expert_ffn", ffn_rows[-1])
    return {"sparse_linear": rows, "expert_ffn": ffn_rows}


def _to(batch: dict[str, torch.Tensor], dev: str) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) for k, v in batch.items()}


def _models(bundle: dict[str, Any], dev: str) -> dict[str, torch.nn.Module]:
    import transformers

    from dyncompile.eval.minilm import EmbeddingClassifier

    cfg = transformers.BertConfig(**{k: v for k, v in bundle["minilm_config"].items()
                                     if k not in ("architectures", "transformers_version")})
    cfg._attn_implementation = "sdpa"

    def encoder() -> torch.nn.Module:
        m = transformers.BertModel(cfg, add_pooling_layer=False)
        missing, unexpected = m.load_state_dict({k: v.float() for k, v in
                                                 bundle["minilm_state"].items()}, strict=False)
        assert not [k for k in missing if "pooler" not in k], missing
        return m.eval().to(dev)

    head = torch.nn.Linear(cfg.hidden_size, len(bundle["labels"]))
    head.load_state_dict(bundle["head_state"])
    return {"minilm": encoder(),
            "classifier": EmbeddingClassifier(encoder(), head).eval().to(dev)}


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _quality(what: str, opt: Any, dense_out: list[torch.Tensor], evals: list[Any],
             labels: torch.Tensor) -> dict[str, float]:
    outs = [_first(opt(**b)).float() for b in evals]
    if what == "classifier":
        pred = torch.cat([o.argmax(-1) for o in outs]).cpu()
        ref = torch.cat([o.argmax(-1) for o in dense_out]).cpu()
        return {"accuracy": float((pred == labels).double().mean()),
                "agreement": float((pred == ref).double().mean())}
    cos = []
    for o, r, b in zip(outs, dense_out, evals):
        m = b["attention_mask"].unsqueeze(-1).float()
        po, pr = (o * m).sum(1) / m.sum(1), (r * m).sum(1) / m.sum(1)
        cos.append(F.cosine_similarity(po, pr, dim=-1))
    return {"cosine": float(torch.cat(cos).mean())}


def section_early_exit(bundle: dict[str, Any], rounds: int, models: list[str],
                       shapes: list[str]) -> dict[str, Any]:
    from early_exit_speed import BUDGETS, VARIANTS, _NoneLeave

    import dyncompile
    from dyncompile.eval.timing import interleaved_samples, paired_speedup

    dev = DEV
    torch._dynamo.config.recompile_limit = 64
    built = _models(bundle, dev)
    cal = [_to(b, dev) for b in bundle["calibration"]]
    evals = [_to(b, dev) for b in bundle["eval"]]
    labels = bundle["eval_labels"]
    res: dict[str, Any] = RESULTS.setdefault("early_exit", {})
    res.update({"rows": [], "quality": [], "graphs": {}})
    for what in models:
        if time_left() < 90:
            log(what, "skipped: too little time left")
            res.setdefault("skipped", []).append(what)
            continue
        model = built[what]
        t0 = time.time()
        dense = torch.compile(model)
        with torch.no_grad():
            dense_out = [_first(dense(**b)).float() for b in evals]
        log(what, "dense compiled", f"{time.time() - t0:.1f}s")
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t0 = time.time()
        opt = dyncompile.optimize(model, methods=["early_exit"], calibration=cal)
        log(what, "optimized", f"{time.time() - t0:.1f}s")
        runtime = opt.state.forms["early_exit"]
        with torch.no_grad():
            for b in (1.0, *BUDGETS, 0.3):
                with dyncompile.budget(b):
                    q = _quality(what, opt, dense_out, evals, labels)
                    q.update(budget=b, spent=opt.stats.fraction)
                res["quality"].append({"what": what, **q})
                log("quality", res["quality"][-1])
        save()
        for label in shapes:
            if time_left() < 20:
                res.setdefault("skipped", []).append(f"{what} {label}")
                continue
            batch = _to(bundle["timing"][label], dev)
            fns = {"dense": lambda b=batch, d=dense: d(**b)}
            info: dict[str, tuple[float, float]] = {}
            for b in (1.0, *VARIANTS, *BUDGETS):
                def call(b: Any = b, batch: Any = batch, opt: Any = opt,
                         runtime: Any = runtime) -> Any:
                    if b in VARIANTS:
                        with _NoneLeave(runtime, **VARIANTS[b]), dyncompile.budget(0.5):
                            return opt(**batch)
                    with dyncompile.budget(b):
                        return opt(**batch)
                with torch.no_grad():
                    call()
                    call()
                info[str(b)] = (opt.stats.fraction, opt.stats.ratio("exit_depth") or 1.0)
                fns[str(b)] = call
            samples = interleaved_samples(fns, repeats=rounds, warmup=3)
            for b in (1.0, *VARIANTS, *BUDGETS):
                spent, depth = info[str(b)]
                res["rows"].append({"what": what, "shape": label, "budget": b,
                                    "spent": spent, "depth": depth,
                                    "dense_ms": 1e3 * med(samples["dense"]),
                                    "ms": 1e3 * med(samples[str(b)]),
                                    "paired": paired_speedup(samples, "dense", str(b))})
                log("early_exit", res["rows"][-1])
            save()
        res["graphs"][what] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        res["graphs"][f"{what} pieces"] = sum(g.graphs for g in runtime.graphs)
    return res


def section_forms(bundle: dict[str, Any], rounds: int) -> dict[str, Any]:
    import dyncompile
    from dyncompile.eval.timing import interleaved_samples, paired_speedup

    dev = DEV
    cal = [_to(b, dev) for b in bundle["calibration"]]
    batch = _to(bundle["timing"]["32x128"], dev)
    res: dict[str, Any] = {}
    for method in ("gated", "expert"):
        if time_left() < 45:
            res[method] = {"skipped": f"{time_left():.0f}s left"}
            continue
        try:
            model = _models(bundle, dev)["minilm"]
            dense = torch.compile(model)
            t0 = time.time()
            opt = dyncompile.optimize(model, methods=[method], calibration=cal)
            log(method, "optimized", f"{time.time() - t0:.1f}s")
            with torch.no_grad():
                ref = _first(dense(**batch)).float()
                rows = []
                fns: dict[str, Any] = {"dense": lambda d=dense: d(**batch)}
                for b in (1.0, 0.5):
                    with dyncompile.budget(b):
                        got = _first(opt(**batch)).float()
                        spent = opt.stats.fraction
                    cos = float(F.cosine_similarity(got.mean(1), ref.mean(1), dim=-1).mean())
                    rows.append({"budget": b, "spent": spent, "cosine": cos})
                    fns[str(b)] = lambda b=b, o=opt: _call_at(o, batch, b)
                samples = interleaved_samples(fns, repeats=rounds, warmup=2)
                for r in rows:
                    r["paired"] = paired_speedup(samples, "dense", str(r["budget"]))
                    r["ms"] = 1e3 * med(samples[str(r["budget"])])
                    r["dense_ms"] = 1e3 * med(samples["dense"])
            res[method] = rows
            log(method, rows)
        except Exception:
            res[method] = {"error": traceback.format_exc()[-4000:]}
            log(method, "FAILED", res[method]["error"])
    return res


def _call_at(opt: Any, batch: dict[str, torch.Tensor], b: float) -> Any:
    import dyncompile

    with dyncompile.budget(b):
        return opt(**batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=".gpu/bundle.pt")
    ap.add_argument("--out", default=os.environ.get("OUT", ".gpu/out"))
    ap.add_argument("--sections", default="pytest,kernels,early_exit,forms")
    ap.add_argument("--deadline", type=float, default=480.0,
                    help="seconds: sections are skipped once less than their share is left")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--models", default="minilm,classifier")
    ap.add_argument("--shapes", default="1x128,32x128,128x128")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEV, OUT_DIR, DEADLINE
    DEV, DEADLINE = args.device, args.deadline
    out = OUT_DIR = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from dyncompile.eval.timing import device_info

    RESULTS["meta"] = {**device_info(), "triton": __import__("triton").__version__,
                       "argv": sys.argv}
    log(RESULTS["meta"])
    bundle = torch.load(args.bundle, weights_only=False) if Path(args.bundle).exists() else None
    need = {"pytest": 40, "kernels": 60, "early_exit": 120, "forms": 90}
    for name in args.sections.split(","):
        left = time_left()
        if left < need.get(name, 60):
            RESULTS[name] = {"skipped": f"{left:.0f}s left"}
            log(name, "skipped")
            continue
        log("==", name)
        try:
            if name == "pytest":
                RESULTS[name] = section_pytest(out)
            elif name == "kernels":
                RESULTS[name] = section_kernels(out, args.rounds)
            elif name == "early_exit":
                RESULTS[name] = section_early_exit(bundle, args.rounds,
                                                   args.models.split(","),
                                                   args.shapes.split(","))
            elif name == "forms":
                RESULTS[name] = section_forms(bundle, max(10, args.rounds // 2))
        except Exception:
            RESULTS[name] = {"error": traceback.format_exc()[-6000:]}
            log(name, "FAILED\n", RESULTS[name]["error"])
        save()
    log("done")
    print(summary(RESULTS), flush=True)


def summary(res: dict[str, Any]) -> str:
    """Markdown tables of what was measured (the end of the output is what comes back)."""
    from _results import markdown_table

    parts = [f"{res['meta'].get('gpu')}, torch {res['meta'].get('torch')}, "
             f"{res['meta'].get('date')}"]
    for name in ("pytest", "kernels", "early_exit", "forms"):
        sec = res.get(name)
        if not isinstance(sec, dict):
            continue
        if "error" in sec or "skipped" in sec:
            parts.append(f"{name}: {sec.get('skipped') or sec['error'].splitlines()[-1]}")
            continue
        if name == "pytest":
            parts.append(f"pytest -m cuda: rc {sec['rc']}: {sec['tail'].strip().splitlines()[-1]}")
        elif name == "kernels":
            parts.append(markdown_table(
                ["in", "out", "tokens", "sparsity", "union", "rel err", "dense us", "sparse us",
                 "speedup", "ideal"],
                [[r["in"], r["out"], r["tokens"], r["sparsity"], f"{r['union_active']:.2f}",
                  f"{r['rel_err']:.1e}", f"{r['dense_us']:.1f}", f"{r['sparse_us']:.1f}",
                  f"{r['speedup']:.2f}", f"{r['ideal']:.2f}"] for r in sec["sparse_linear"]]))
            parts.append(markdown_table(
                ["d", "h", "experts", "tokens", "keep", "rel err", "dense us", "expert us",
                 "speedup"],
                [[r["d"], r["h"], r["experts"], r["tokens"], r["keep"], f"{r['rel_err']:.1e}",
                  f"{r['dense_us']:.1f}", f"{r['expert_us']:.1f}", f"{r['speedup']:.2f}"]
                 for r in sec["expert_ffn"]]))
        elif name == "early_exit":
            parts.append(markdown_table(
                ["model", "budget", "spent", "quality"],
                [[q["what"], q["budget"], f"{q['spent']:.3f}",
                  ", ".join(f"{k} {q[k]:.3f}" for k in ("cosine", "accuracy", "agreement")
                            if k in q)] for q in sec.get("quality", [])]))
            parts.append(markdown_table(
                ["model", "tokens", "budget", "spent", "depth", "dense ms", "ms", "paired"],
                [[r["what"], r["shape"], r["budget"], f"{r['spent']:.3f}", f"{r['depth']:.3f}",
                  f"{r['dense_ms']:.3f}", f"{r['ms']:.3f}", f"{r['paired']:.3f}"]
                 for r in sec.get("rows", [])]))
            parts.append(f"graphs: {sec.get('graphs')}")
        elif name == "forms":
            for method, rows in sec.items():
                if isinstance(rows, dict):
                    why = rows.get("skipped") or rows["error"].splitlines()[-1]
                    parts.append(f"{method}: {why}")
                    continue
                parts.append(f"{method}: " + "; ".join(
                    f"budget {r['budget']} spent {r['spent']:.3f} cosine {r['cosine']:.3f} "
                    f"paired {r['paired']:.3f}" for r in rows))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
