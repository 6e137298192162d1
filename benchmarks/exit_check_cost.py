"""What each fused exit check costs over its plain layer piece, on CPU, cold caches.

For MiniLM or the MiniLM classifier (calibrated as in ``early_exit_speed.py``),
records the generated-code calls of one none-leave call (every exit checked)
and of one call with no check, then times each exit's fused check graph
(layer ``k - 1`` with exit ``k``'s check) against the plain layer piece on the
same inputs, each call preceded by the last layer's piece so that the caches
hold what they hold between two layers. Reports medians and the median of
paired differences per exit.

    python benchmarks/exit_check_cost.py [--model minilm] [--rounds 200]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _results import finish, markdown_table, minilm_batches
from early_exit_speed import _model, _NoneLeave

import dyncompile
from dyncompile.eval.timing import device_info
from dyncompile.forms.early_exit import program as exit_program
from dyncompile.module import call_batch
from dyncompile.program.direct_call import DirectCall


def _calls(opt: Any, runtime: Any, batch: Any, **variant: Any) -> list[tuple[Any, tuple]]:
    """(generated code, arguments) of each compiled piece one call runs, in order."""
    calls: list[tuple[Any, tuple]] = []
    original, fast = DirectCall.__call__, exit_program.ExitRunner._fast_path

    def spy(self: DirectCall, *args: Any) -> Any:
        calls.append((self.inner, args))
        return original(self, *args)

    DirectCall.__call__ = spy  # type: ignore[method-assign]
    exit_program.ExitRunner._fast_path = lambda runner, t: None  # type: ignore[method-assign]
    try:
        with torch.no_grad(), _NoneLeave(runtime, **variant), dyncompile.budget(0.5):
            call_batch(opt, batch)
    finally:
        DirectCall.__call__ = original  # type: ignore[method-assign]
        exit_program.ExitRunner._fast_path = fast  # type: ignore[method-assign]
    return calls


def run(model_name: str, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    cal, timing = minilm_batches(((1, 128),))
    batch = timing["1x128"]
    opt = dyncompile.optimize(_model(model_name), methods=["early_exit"], calibration=cal)
    runtime = opt.state.forms["early_exit"]
    for _ in range(2):  # compiled pieces check out against their wrappers
        _calls(opt, runtime, batch)
        _calls(opt, runtime, batch, checks=False)
    checked, plain = _calls(opt, runtime, batch), _calls(opt, runtime, batch, checks=False)
    exits = len(runtime.maps)
    if any(fn is None for fn, _ in [*checked, *plain]):
        raise SystemExit("a piece does not call its generated code directly")
    flush_fn, flush_args = plain[exits]  # the last layer's piece
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(rounds):
            for k in range(1, exits + 1):
                for name, (fn, args) in ((f"plain {k}", plain[k - 1]),
                                         (f"check {k}", checked[k - 1])):
                    flush_fn(list(flush_args))
                    t = time.perf_counter()
                    fn(list(args))
                    times.setdefault(name, []).append(time.perf_counter() - t)
    rows = []
    for k in range(1, exits + 1):
        p, c = times[f"plain {k}"], times[f"check {k}"]
        rows.append({"exit": k, "plain_us": 1e6 * statistics.median(p),
                     "check_us": 1e6 * statistics.median(c),
                     "extra_us": 1e6 * statistics.median([b - a for a, b in zip(p, c)])})
    return {"meta": {**device_info(), "model": model_name, "rounds": rounds}, "rows": rows}


def table(res: dict[str, Any]) -> str:
    rows = res["rows"]
    body = [[r["exit"], f"{r['plain_us']:.0f}", f"{r['check_us']:.0f}", f"{r['extra_us']:.1f}"]
            for r in rows]
    body.append(["sum", "", "", f"{sum(r['extra_us'] for r in rows):.0f}"])
    return markdown_table(["exit", "layer piece us", "fused check us", "paired extra us"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=["minilm", "classifier"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json", default="benchmarks/results/exit_check_cost.json")
    args = ap.parse_args()
    res = run(args.model, args.rounds)
    finish(res, args.json, table(res))


if __name__ == "__main__":
    main()
