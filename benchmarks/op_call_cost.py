"""Per-call cost of the gated op on a tiny linear (64 x 64, one token), against F.linear.

At this size the product itself takes a few microseconds, so the difference is the op's
own cost per call (dispatch, threshold lookup, stats): what each rewritten linear adds
to a decode step. Median of 5 rounds of 2000 calls, 2 threads.

    python benchmarks/op_call_cost.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dyncompile
from dyncompile.eval.timing import device_info
from dyncompile.testing.zoo import ZOO


def per_call_us(fn, calls: int = 2000, rounds: int = 5) -> float:
    for _ in range(100):
        fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(out)


def main() -> None:
    torch.set_num_threads(2)
    entry = ZOO["llama"]
    opt = dyncompile.optimize(entry.build(), methods=["gated"], compiler="eager", plan=False,
                              calibration=[entry.inputs(2, 8)] * 2)
    site = next(iter(opt.state.forms["gated"].tables))
    x, wt = torch.randn(1, 64), torch.randn(64, 64)
    res = {"meta": device_info(), "us_per_call": {}}
    with torch.no_grad():
        res["us_per_call"]["F.linear"] = per_call_us(lambda: F.linear(x, wt.t()))
        for b in (1.0, 0.5):
            opt.budget = b
            opt.state.sync()
            res["us_per_call"][f"gated_linear@{b}"] = per_call_us(
                lambda: torch.ops.dyncompile.gated_linear.default(x, wt, None, opt.state.id,
                                                                  site))
    Path("benchmarks/results/op_call_cost.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["us_per_call"], indent=2))


if __name__ == "__main__":
    main()
