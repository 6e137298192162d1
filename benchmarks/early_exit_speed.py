"""Early exit on CPU: MiniLM and the MiniLM classifier against dense, same run.

Both are calibrated on the harness's calibration sentences, compiled by the
``dyn`` backend (Inductor, every piece) with ``methods=["early_exit"]``, and
timed interleaved with the dense model under the default ``torch.compile``
backend: median of repeats, 2 threads, on batches of real sentences of exactly
128 tokens (1x128 and 32x128). "paired speedup" is the median over rounds of
dense / early_exit within each round, steadier than the ratio of the medians
when the machine's speed drifts. Rows per budget: 1.0 (no exit checked), a
worst case where every exit is checked and no row leaves ("checked, none
leave": the overhead of the exit checks and of running in pieces), the same
with the checks run on their own instead of inside the layer pieces ("checks
unfused"), the layers run piece by piece with no check ("pieces, no check"),
the first and the last of these through the runner's generic loop instead of
its straight-line path (", generic loop"; ``dyncompile/forms/early_exit/fast.py``),
and budgets 0.8 / 0.6 / 0.4, with the spent FLOP fraction and mean depth the
runtime reports. Also counts the graphs dynamo compiled for the pieces.

``--models bert_cls`` times HF's BERT classifier on MiniLM's encoder (its
classification layer untrained: speed rows only).

    python benchmarks/early_exit_speed.py [--repeats 20] [--shapes 1x128,32x128]
        [--models minilm,classifier] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from _results import finish, markdown_table, minilm_batches

import dyncompile
from dyncompile.eval.minilm import (
    ClassifierWorkload,
)
from dyncompile.eval.timing import device_info, interleaved_samples, paired_speedup
from dyncompile.forms.early_exit.program import ExitRunner
from dyncompile.module import call_batch
from dyncompile.testing.zoo import load_minilm, minilm_path

BUDGETS = (0.8, 0.6, 0.4)
SHAPES = ((1, 128), (32, 128))
NONE_LEAVE = "checked, none leave"
UNFUSED = "checked, none leave, checks unfused"
PIECES = "pieces, no check"
GENERIC = ", generic loop"  # the same without the straight-line path (forms/early_exit/fast.py)


_FAST: dict[tuple[int, bool, bool], dict] = {}


class _NoneLeave:
    """Every exit evaluated, no row leaves (patches the runtime for one call); ``fused``
    False: the checks run on their own, not inside the layer pieces; ``checks`` False:
    no exit is evaluated but the layers still run piece by piece; ``straight`` False:
    the runner's generic loop runs every exit, not its straight-line path."""

    def __init__(self, runtime: Any, fused: bool = True, checks: bool = True,
                 straight: bool = True) -> None:
        self.rt, self.fused, self.checks, self.straight = runtime, fused, checks, straight

    def __enter__(self) -> None:
        n = len(self.rt.maps)
        self.saved = (self.rt.plan, self.rt.cut, [g.checks for g in self.rt.graphs])
        # One fired exit (past the last) keeps the runner from taking the whole graph.
        self.rt.plan = (lambda t, k: ([True] * k, [True] * k)) if self.checks \
            else (lambda t, k: ([False] * (k - 1) + [True], [False] * k))
        never = torch.tensor(float("inf"))  # the cut no signal reaches
        self.rt.cut = lambda k, t: never
        if not self.fused:
            for g in self.rt.graphs:
                g.checks = None
        # The straight-line paths the runtime made are for its real plan and cuts: this
        # variant keeps its own, from one call to the next.
        self.fast = self.rt._fast
        self.rt._fast = _FAST.setdefault((id(self.rt), self.fused, self.checks), {})
        self.fast_path = ExitRunner._fast_path
        if not self.straight:
            ExitRunner._fast_path = lambda runner, threshold: None  # type: ignore[method-assign]
        assert n > 0

    def __exit__(self, *exc: Any) -> None:
        self.rt.plan, self.rt.cut, checks = self.saved
        self.rt._fast = self.fast
        ExitRunner._fast_path = self.fast_path  # type: ignore[method-assign]
        for g, c in zip(self.rt.graphs, checks):
            g.checks = c


VARIANTS = {NONE_LEAVE: {}, UNFUSED: {"fused": False}, PIECES: {"checks": False},
            NONE_LEAVE + GENERIC: {"straight": False},
            PIECES + GENERIC: {"checks": False, "straight": False}}


MODELS = ("minilm", "classifier")
# Timed on request only: HF's BERT classifier on MiniLM's encoder and pooler, its
# classification layer untrained (8 labels, seed 0): the pooler's linear reads the
# first token, so the exit adapter folds into it (passes/exit_checks.head_linear). Its
# exits decide on an untrained head, so only its speed rows mean anything.
EXTRA_MODELS = ("bert_cls",)


def _model(what: str) -> torch.nn.Module:
    if what == "minilm":
        return load_minilm().eval()
    if what == "bert_cls":
        import transformers

        torch.manual_seed(0)
        return transformers.BertForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=8).eval()
    return ClassifierWorkload().model


def run(repeats: int, shapes: tuple = SHAPES, models: tuple = MODELS) -> dict[str, Any]:
    cal, timing = minilm_batches(shapes)
    rows: list[dict[str, Any]] = []
    graphs: dict[str, int] = {}
    for what in models:
        model = _model(what)
        dense = torch.compile(model)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        opt = dyncompile.optimize(model, methods=["early_exit"], calibration=cal)
        runtime = opt.state.forms["early_exit"]
        points = (1.0, *VARIANTS, *BUDGETS)
        for label, batch in timing.items():
            reps = repeats if label.startswith("1x") else max(8, repeats // 2)
            fns = {"dense": lambda b=batch, d=dense: call_batch(d, b)}
            info: dict[str, tuple[float, float]] = {}
            for b in points:
                def call(b: Any = b, batch: Any = batch, opt: Any = opt,
                         runtime: Any = runtime) -> Any:
                    if b in VARIANTS:
                        with _NoneLeave(runtime, **VARIANTS[b]), dyncompile.budget(0.5):
                            return call_batch(opt, batch)
                    with dyncompile.budget(b):
                        return call_batch(opt, batch)
                with torch.no_grad():
                    call()
                    call()
                key = str(b)
                info[key] = (opt.stats.fraction, opt.stats.ratio("exit_depth") or 1.0)
                fns[key] = call
            with torch.no_grad():
                samples = interleaved_samples(fns, repeats=reps, warmup=2)
            t = {k: statistics.median(v) for k, v in samples.items()}
            for b in points:
                key = str(b)
                spent, depth = info[key]
                rows.append({"what": what, "shape": label, "budget": b,
                             "spent": spent, "depth": depth, "dense_ms": 1e3 * t["dense"],
                             "ms": 1e3 * t[key], "speedup": t["dense"] / t[key],
                             "paired": paired_speedup(samples, "dense", key)})
                print(rows[-1], flush=True)
        graphs[what] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        graphs[f"{what} pieces"] = sum(g.graphs for g in runtime.graphs)
    return {"meta": {**device_info(), "repeats": repeats}, "rows": rows,
            "graphs_compiled": graphs}


def table(res: dict[str, Any]) -> str:
    return markdown_table(
        ["model", "tokens", "budget", "FLOPs spent", "mean depth", "dense ms",
         "early_exit ms", "speedup", "paired speedup"],
        [[r["what"], r["shape"], r["budget"], f"{r['spent']:.3f}",
          f"{r['depth']:.3f}", f"{r['dense_ms']:.2f}", f"{r['ms']:.2f}", f"{r['speedup']:.2f}",
          f"{r['paired']:.3f}"]
         for r in res["rows"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--shapes", default="1x128,32x128")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", default="benchmarks/results/early_exit_speed.json")
    args = ap.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    models = tuple(args.models.split(","))
    unknown = set(models) - set(MODELS) - set(EXTRA_MODELS)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; choose from "
                 f"{list(MODELS) + list(EXTRA_MODELS)}")
    res = run(args.repeats, shapes, models)
    finish(res, args.json, table(res),
           f"graphs compiled (dynamo graphs, dense and dyn; Inductor pieces of the cut "
           f"graphs): {res['graphs_compiled']}")


if __name__ == "__main__":
    main()
