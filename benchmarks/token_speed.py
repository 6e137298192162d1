"""The ``token`` form on CPU: MiniLM embeddings against dense, same run.

MiniLM (all-MiniLM-L6-v2) is compiled by the ``dyn`` backend with
``methods=["token"]`` (Inductor, one piece per residual block) and timed
interleaved with the dense model under the default ``torch.compile`` backend:
median of repeats, 2 threads. Batches: rows of real text of exactly 1x128,
32x128 and 8x512 tokens, and "32 short": 32 of the harness's evaluation
sentences, sorted by length and padded to the longest (about 20-30 tokens). Per
budget: the FLOP fraction the runtime reports, the tokens the deepest block
sees, the cosine of the mean-pooled embeddings to dense on the same batch, the
ratio of the medians and the paired speedup (median over rounds of dense /
token within each round).

    python benchmarks/token_speed.py [--repeats 10] [--budgets 1.0,0.85,0.7,0.5]
        [--shapes 1x128,32x128,8x512] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from _results import finish, markdown_table, minilm_batches

import dyncompile
from dyncompile.eval.corpus import splits
from dyncompile.eval.minilm import hidden_states, load_tokenizer, mean_pool, tokenize
from dyncompile.eval.timing import device_info, interleaved_samples, paired_speedup
from dyncompile.module import call_batch
from dyncompile.testing.zoo import load_minilm

SHAPES = ((1, 128), (32, 128), (8, 512))
BUDGETS = (1.0, 0.85, 0.7, 0.5)


def _short_batch() -> dict[str, torch.Tensor]:
    texts = sorted((x.text for x in splits().evaluation), key=len)
    mid = len(texts) // 2
    return tokenize(load_tokenizer(), texts[mid:mid + 32])


def _embed(fn: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return mean_pool(hidden_states(call_batch(fn, batch)).float(), batch["attention_mask"])


def run(repeats: int, shapes: tuple = SHAPES, budgets: tuple = BUDGETS) -> dict[str, Any]:
    _, timing = minilm_batches(shapes)
    timing["32 short"] = _short_batch()
    model = load_minilm().eval()
    dense = torch.compile(model)
    opt = dyncompile.optimize(model, methods=["token"])
    rows: list[dict[str, Any]] = []
    for label, batch in timing.items():
        fns = {"dense": lambda b=batch: call_batch(dense, b)}
        info: dict[str, tuple[float, int, float]] = {}
        with torch.no_grad():
            ref = _embed(model, batch)
            for b in budgets:
                def call(b: float = b, batch: Any = batch) -> Any:
                    with dyncompile.budget(b):
                        return call_batch(opt, batch)
                call()
                with dyncompile.budget(b):
                    emb = _embed(opt, batch)
                runtime = opt.state.forms["token"]  # made at the first call
                deepest = runtime.last_tokens[-1] if b < 1.0 else \
                    int(batch["input_ids"].shape[1])
                cos = float(F.cosine_similarity(emb, ref).mean())
                info[str(b)] = (opt.stats.fraction, deepest, cos)
                fns[str(b)] = call
            samples = interleaved_samples(fns, repeats=repeats, warmup=2)
        t = {k: statistics.median(v) for k, v in samples.items()}
        for b in budgets:
            key = str(b)
            spent, deepest, cos = info[key]
            rows.append({"shape": label, "tokens": int(batch["input_ids"].shape[1]),
                         "budget": b, "spent": spent, "deepest": deepest, "cosine": cos,
                         "dense_ms": 1e3 * t["dense"], "ms": 1e3 * t[key],
                         "speedup": t["dense"] / t[key],
                         "paired": paired_speedup(samples, "dense", key)})
            print(rows[-1], flush=True)
    return {"meta": {**device_info(), "repeats": repeats}, "rows": rows}


def table(res: dict[str, Any]) -> str:
    return markdown_table(
        ["batch", "budget", "FLOPs spent", "tokens in the last block", "cosine to dense",
         "dense ms", "token ms", "speedup", "paired speedup"],
        [[r["shape"], r["budget"], f"{r['spent']:.3f}", f"{r['deepest']} of {r['tokens']}",
          f"{r['cosine']:.4f}", f"{r['dense_ms']:.1f}", f"{r['ms']:.1f}",
          f"{r['speedup']:.2f}", f"{r['paired']:.2f}"] for r in res["rows"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES))
    ap.add_argument("--json", default="benchmarks/results/token_speed.json")
    args = ap.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    budgets = tuple(float(b) for b in args.budgets.split(","))
    if any(not 0.0 < b <= 1.0 for b in budgets):
        ap.error("budgets must be in (0, 1]")
    res = run(args.repeats, shapes, budgets)
    finish(res, args.json, table(res))


if __name__ == "__main__":
    main()
