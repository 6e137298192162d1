"""Early exit on the MiniLM classifier: what each part of the exit decision buys.

Runs the harness's classifier workload (calibration split, evaluation split)
with ``methods=["early_exit"]`` and several ``form_options`` at the given
budgets, and prints accuracy, agreement with dense, the FLOP fraction the
runtime reports and the mean depth. ``compiler="eager"`` (quality only).

    python benchmarks/early_exit_ablation.py [--budgets 0.8,0.6] [--json PATH]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _results import finish, markdown_table

import dyncompile
from dyncompile.eval.registry import make_workload
from dyncompile.eval.timing import device_info

VARIANTS: dict[str, dict[str, Any]] = {
    "default (affine adapters refitted on pooled rows, adapted signal)": {},
    "adapters fitted on tokens only": {"adapter_fit": "tokens"},
    "no adapters": {"adapter": "none"},
    "signal from the unadapted state": {"signal_from": "raw"},
    "adapters tuned through the head (200 steps)": {"tune_steps": 200},
}


def run(budgets: list[float]) -> dict[str, Any]:
    torch.set_num_threads(2)
    w = make_workload("classifier")
    dense = w.evaluate(w.model)
    rows = []
    for label, opts in VARIANTS.items():
        opt = dyncompile.optimize(w.model, methods=["early_exit"], calibration=w.calibration(),
                                  compiler="eager", form_options={"early_exit": opts})
        for b in budgets:
            spent: list[float] = []
            depth: list[float] = []

            def call(*args: Any, spent: list = spent, depth: list = depth,
                     opt: Any = opt, **kwargs: Any) -> Any:
                out = opt(*args, **kwargs)
                spent.append(opt.stats.fraction)
                depth.append(opt.stats.ratio("exit_depth") or 1.0)
                return out

            with dyncompile.budget(b):
                m = w.evaluate(call)
            rows.append({"variant": label, "options": opts, "budget": b, **m,
                         "spent": sum(spent) / len(spent), "depth": sum(depth) / len(depth)})
            print(rows[-1], flush=True)
    return {"meta": device_info(), "dense": dense, "rows": rows}


def table(res: dict[str, Any]) -> str:
    acc = res["dense"]["accuracy"]
    return markdown_table(
        ["variant", "budget", "accuracy", "% of dense", "agreement", "FLOPs spent",
         "mean depth"],
        [[r["variant"], r["budget"], f"{r['accuracy']:.3f}", f"{100 * r['accuracy'] / acc:.1f}",
          f"{r['agreement']:.3f}", f"{r['spent']:.3f}", f"{r['depth']:.3f}"]
         for r in res["rows"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.8,0.6")
    ap.add_argument("--json", default="benchmarks/results/early_exit_ablation.json")
    args = ap.parse_args()
    res = run([float(b) for b in args.budgets.split(",")])
    finish(res, args.json, table(res))


if __name__ == "__main__":
    main()
