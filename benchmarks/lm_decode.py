"""Decode speed of the project's LM: a form at several budgets vs dense, same run.

Both models go through Hugging Face ``generate()`` (greedy, KV cache): dense
with its ``forward`` compiled by the default ``torch.compile`` backend, the
optimized one as ``dyncompile.optimize(model, methods=[method], calibration=...)``
and ``opt.generate()`` (``gated`` by default; form options as in ``dyncompile
bench``, e.g. ``gated:glu=cats``; calibrated on the LM workload's calibration
batches). Calls are interleaved, the median of repeats is kept, 2 threads. The
batch is one prompt unless ``--batch`` says more.

    python benchmarks/lm_decode.py [--method gated] [--budgets 1.0,0.5] [--new-tokens 64]
                                   [--repeats 5] [--batch 1]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

import dyncompile
from dyncompile.eval.lm import PAD, LMWorkload, encode, load_lm
from dyncompile.eval.sweep import parse_method
from dyncompile.eval.timing import device_info, time_interleaved


def run(budgets: list[float], new_tokens: int, repeats: int, prompt_len: int,
        method: str = "gated", batch: int = 1) -> dict[str, Any]:
    form, opts = parse_method(method)
    torch.set_num_threads(2)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    base = load_lm()
    workload = LMWorkload()
    dense = copy.deepcopy(base)
    dense.forward = torch.compile(dense.forward)
    opt = dyncompile.optimize(copy.deepcopy(base), methods=[form],
                              calibration=workload.calibration(),
                              form_options={form: opts} if opts else None)

    text = "The interpreter reads the source code and executes the statements in order. "
    ids = encode(text * 4, eos=False)[:prompt_len].unsqueeze(0).repeat(batch, 1)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD)

    def gen(model: Any, budget: float | None = None) -> torch.Tensor:
        if budget is None:
            return model.generate(ids, **kw)
        with dyncompile.budget(budget):
            return model.generate(ids, **kw)

    spent: dict[str, float] = {}

    def gen_opt(b: float) -> torch.Tensor:
        out = gen(opt, b)
        spent[f"{method}@{b}"] = opt.stats.fraction
        return out

    fns = {"dense": lambda: gen(dense)}
    for b in budgets:
        fns[f"{method}@{b}"] = lambda b=b: gen_opt(b)
    with torch.no_grad():
        same = torch.equal(gen(dense), gen(opt, 1.0))
    compiles = dyncompile.compile_count()
    t = time_interleaved(fns, repeats=repeats, warmup=2)
    tokens_s = {k: batch * new_tokens / v for k, v in t.items()}
    return {"meta": {**device_info(), "method": method, "new_tokens": new_tokens,
                     "prompt_len": prompt_len, "repeats": repeats, "batch": batch},
            "greedy_equal_at_budget_1": same,
            "recompiles_while_timing": dyncompile.compile_count() - compiles,
            "tokens_per_s": tokens_s,
            "spent_fraction": spent,
            "speedup": {k: v / tokens_s["dense"] for k, v in tokens_s.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="gated")
    ap.add_argument("--budgets", default="1.0,0.5")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/lm_decode.json")
    args = ap.parse_args()
    res = run([float(b) for b in args.budgets.split(",")], args.new_tokens, args.repeats,
              args.prompt_len, args.method, args.batch)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))


if __name__ == "__main__":
    main()
