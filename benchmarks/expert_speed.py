"""Expert form on CPU: MiniLM's FFN alone and the whole model, against dense, same run.

The FFN is MiniLM's layer-0 FFN (384 -> 1536 -> 384, GELU), fed the hidden
states it sees on real text; the whole model is all-MiniLM-L6-v2. Both are
calibrated on the harness's calibration sentences, compiled by the ``dyn``
backend (Inductor) with ``methods=["expert"]``, and timed interleaved with the
dense module under the default ``torch.compile`` backend: median of repeats,
2 threads, at 1x128 and 32x128 tokens, budgets 0.25 / 0.5 / 0.75. The
runtime's spent FFN fraction (router included) is reported next to each time.
"paired speedup" is the median over rounds of dense / expert within each round,
steadier than the ratio of the medians when the machine's speed drifts.

    python benchmarks/expert_speed.py [--repeats 20] [--calibration packed]
        [--options '{"router_hidden": 64}'] [--shapes 1x128,32x128] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any

import torch
from _results import finish, markdown_table, minilm_batches
from torch import nn

import dyncompile
from dyncompile.eval.timing import device_info, interleaved_samples, paired_speedup
from dyncompile.module import call_batch
from dyncompile.testing.zoo import load_minilm

BUDGETS = (0.75, 0.5, 0.25)
SHAPES = ((1, 128), (32, 128))


class FFN(nn.Module):
    """One BERT-style FFN: down(gelu(up(x)))."""

    def __init__(self, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _ffn_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Inputs of layer 0's FFN on these batches (captured once with a hook)."""
    seen: list[torch.Tensor] = []
    layer = model.encoder.layer[0]
    handle = layer.intermediate.dense.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    return seen


def run(repeats: int, calibration: str = "sentences",
        options: dict[str, Any] | None = None, shapes: tuple = SHAPES) -> dict[str, Any]:
    cal, timing = minilm_batches(shapes, calibration)
    rows: list[dict[str, Any]] = []

    base = load_minilm()
    layer = base.encoder.layer[0]
    ffn = FFN(copy.deepcopy(layer.intermediate.dense), copy.deepcopy(layer.output.dense)).eval()
    ffn_cal = [(x,) for x in _ffn_inputs(base, cal)]
    ffn_timing = {k: (_ffn_inputs(base, [v])[0],) for k, v in timing.items()}
    cases = [("ffn", ffn, ffn_cal, ffn_timing), ("minilm", load_minilm(), cal, timing)]
    for what, model, calib, inputs in cases:
        dense = torch.compile(model)
        opt = dyncompile.optimize(model, methods=["expert"], calibration=calib,
                                  form_options={"expert": dict(options or {})})
        for label, batch in inputs.items():
            reps = repeats if label.startswith("1x") else max(8, repeats // 2)
            fns = {"dense": lambda b=batch, d=dense: call_batch(d, b)}
            spent = {}
            for b in BUDGETS:
                def call(b: float = b, batch: Any = batch, opt: Any = opt) -> Any:
                    with dyncompile.budget(b):
                        return call_batch(opt, batch)
                with torch.no_grad():
                    call()
                    spent[b] = opt.stats.ratio("expert_compute")
                fns[f"b{b}"] = call
            with torch.no_grad():
                samples = interleaved_samples(fns, repeats=reps, warmup=2)
            t = {k: statistics.median(v) for k, v in samples.items()}
            for b in BUDGETS:
                rows.append({"what": what, "shape": label, "budget": b,
                             "spent_ffn": spent[b], "dense_ms": 1e3 * t["dense"],
                             "ms": 1e3 * t[f"b{b}"], "speedup": t["dense"] / t[f"b{b}"],
                             "paired": paired_speedup(samples, "dense", f"b{b}")})
                print(rows[-1], flush=True)
    return {"meta": {**device_info(), "repeats": repeats, "calibration": calibration,
                     "options": options or {}},
            "rows": rows}


def table(res: dict[str, Any]) -> str:
    return markdown_table(
        ["what", "tokens", "budget", "FFN compute spent", "dense ms", "expert ms", "speedup",
         "paired speedup"],
        [[r["what"], r["shape"], r["budget"],
          f"{r['spent_ffn']:.3f}" if r["spent_ffn"] is not None else "-",
          f"{r['dense_ms']:.2f}", f"{r['ms']:.2f}", f"{r['speedup']:.2f}",
          f"{r['paired']:.3f}"] for r in res["rows"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calibration", choices=("sentences", "packed"), default="sentences",
                    help="the harness's padded sentences, or serving-like unpadded 128-token "
                         "rows from other text")
    ap.add_argument("--options", default="{}", help="expert form options as JSON, e.g. "
                    "'{\"router_hidden\": 64}'")
    ap.add_argument("--shapes", default="1x128,32x128")
    ap.add_argument("--json", default="benchmarks/results/expert_speed.json")
    args = ap.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    res = run(args.repeats, args.calibration, json.loads(args.options), shapes)
    finish(res, args.json, table(res))


if __name__ == "__main__":
    main()
