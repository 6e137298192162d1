"""Sweep methods x budgets x workloads; every result measured against dense in the same run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..api import optimize
from ..core.budget import budget as budget_ctx
from ..module import call_batch
from .registry import make_workload
from .timing import device_info, time_interleaved
from .workload import Workload

DEFAULT_BUDGETS = (1.0, 0.75, 0.5, 0.3, 0.2)


@dataclass
class Result:
    """One (workload, method, budget) point."""

    workload: str
    method: str
    budget: float
    metrics: dict[str, float]
    spent: float                       # mean compute fraction the runtime reported
    ratios: dict[str, float] = field(default_factory=dict)  # forms' ratios, e.g. active_channels
    latency_ms: dict[str, float] = field(default_factory=dict)       # shape -> ms
    dense_latency_ms: dict[str, float] = field(default_factory=dict)  # same run
    speedup: dict[str, float] = field(default_factory=dict)          # dense / this


class _Recorder:
    """Calls an optimized model and averages the compute fraction it reports."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.fractions: list[float] = []
        self.counters: dict[str, list[float]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.opt(*args, **kwargs)
        stats = getattr(self.opt, "stats", None)
        if stats is not None:
            self.fractions.append(stats.fraction)
            for k, (num, den) in stats.counters.items():
                acc = self.counters.setdefault(k, [0.0, 0.0])
                acc[0] += num
                acc[1] += den
        return out

    @property
    def ratios(self) -> dict[str, float]:
        return {k: n / d for k, (n, d) in self.counters.items() if d}

    @property
    def spent(self) -> float:
        return sum(self.fractions) / len(self.fractions) if self.fractions else 1.0


def _timing(workload: Workload, dense_compiled: Callable, candidate: Callable, repeats: int,
            warmup: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    lat, dense_lat, speed = {}, {}, {}
    for label, batch in workload.timing_inputs().items():
        t = time_interleaved({"dense": lambda b=batch: call_batch(dense_compiled, b),
                              "candidate": lambda b=batch: call_batch(candidate, b)},
                             repeats=repeats, warmup=warmup)
        lat[label] = 1e3 * t["candidate"]
        dense_lat[label] = 1e3 * t["dense"]
        speed[label] = t["dense"] / t["candidate"]
    return lat, dense_lat, speed


PLANNED = "planned"


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gated:glu=cats+allocation=greedy"`` -> ("gated", {"glu": "cats", ...}).

    A method is a form name, optionally with form options after a colon
    (``key=value`` pairs joined by ``+``; integer values become ints). The
    full spec is the method's label in results, tables and plots. ``"planned"``
    is every form under one budget, as ``optimize(model, budget=b)`` plans them;
    its options: ``unit=time`` (the budget in measured time, not FLOPs) and
    ``forms=expert/early_exit`` (restrict the forms, ``/``-separated).
    """
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"method {spec!r}: options are key=value pairs joined by '+'")
        opts[key] = int(value) if value.isdigit() else value
    if name == PLANNED and set(opts) - {"unit", "forms"}:
        raise ValueError(f"method {spec!r}: planned takes unit=flops|time and forms=a/b")
    return name, opts


def _optimized(dense: Any, method: str, workload: Workload) -> Any:
    form, opts = parse_method(method)
    calibration = workload.calibration()
    if form == PLANNED:
        forms = opts["forms"].split("/") if "forms" in opts else None
        return optimize(dense, methods=forms, calibration=calibration,
                        budget_unit=opts.get("unit", "flops"), quality=workload.quality)
    return optimize(dense, methods=[form], calibration=calibration, plan=False,
                    form_options={form: opts} if opts else None)


def run_sweep(workloads: list[str | Workload], methods: list[str], budgets: tuple[float, ...] =
              DEFAULT_BUDGETS, quick: bool = False, timing: bool = True,
              repeats: int | None = None, seed: int = 0, progress: bool = True,
              threads: int = 2) -> dict[str, Any]:
    """Run the sweep and return a JSON-able dict of results.

    The "dense" method is always measured: the plain model's quality scores its
    reference values, and ``optimize()`` with no form is timed against the dense
    model compiled with the default backend (a ratio near 1.0 is the sanity check).
    """
    torch.set_num_threads(threads)
    # The dense baseline, the plain dyn model and each form's model compile the same
    # code objects with different backends and shapes: each is a dynamo cache entry.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024)
    repeats = repeats or (5 if quick else 20)
    warmup = 1 if quick else 3
    out: dict[str, Any] = {
        "meta": {**device_info(), "quick": quick, "seed": seed, "repeats": repeats,
                 "budgets": list(budgets), "methods": list(methods),
                 "command": " ".join(["dyncompile", "bench", *sys.argv[2:]])
                 if sys.argv and sys.argv[0].endswith("dyncompile") else None},
        "workloads": {},
    }
    points = len(workloads) * (1 + len(methods) * len(budgets))
    bar = tqdm(total=points, desc="bench", disable=not progress, unit="point")
    for spec in workloads:
        w = make_workload(spec, quick=quick, seed=seed) if isinstance(spec, str) else spec
        name = w.name
        dense = w.model
        results: list[Result] = []
        bar.set_postfix_str(f"{name}: dense")
        with torch.no_grad():
            ref = w.evaluate(dense)
            again = w.evaluate(dense)
        if ref != again:
            raise RuntimeError(f"{name}: dense model does not reproduce its own metrics: "
                               f"{ref} vs {again}")
        dense_compiled = torch.compile(dense)
        plain = _Recorder(optimize(dense, methods=[]))
        with torch.no_grad():
            w.evaluate(plain)
        lat, dlat, speed = (_timing(w, dense_compiled, plain, repeats, warmup)
                            if timing else ({}, {}, {}))
        results.append(Result(name, "dense", 1.0, ref, plain.spent, plain.ratios, lat, dlat,
                              speed))
        bar.update(1)
        for method in methods:
            bar.set_postfix_str(f"{name}: {method}, calibrating")
            opt = _optimized(dense, method, w)
            for b in budgets:
                bar.set_postfix_str(f"{name}: {method} @ {b}")
                rec = _Recorder(opt)
                with torch.no_grad(), budget_ctx(b):
                    metrics = w.evaluate(rec)
                    lat, dlat, speed = (_timing(w, dense_compiled, opt, repeats, warmup)
                                        if timing else ({}, {}, {}))
                results.append(Result(name, method, b, metrics, rec.spent, rec.ratios, lat, dlat,
                                      speed))
                bar.update(1)
        out["workloads"][name] = {
            "info": w.info(),
            "metrics": list(w.metrics),
            "higher_is_better": {m: w.higher_is_better.get(m, True) for m in w.metrics},
            "results": [asdict(r) for r in results],
        }
        torch._dynamo.reset()
    bar.close()
    return out


def save(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
