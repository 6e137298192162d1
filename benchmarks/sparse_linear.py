"""sparse_linear vs F.linear on CPU: the decode-regime speed of the gated form's kernel.

For each shape, token count and sparsity, the dense F.linear (weight [out, in],
contiguous: its best layout) and sparse_linear's kernel (input-major weight,
threshold set to the |x| quantile that gives the sparsity) are timed
interleaved in one process, median of repeats, 2 threads. The same C++ kernel
with every row active is timed too: it is a dense candidate of its own (at one
token it can beat F.linear), so the table gives the speedup against F.linear
and against the faster of the two.

    python benchmarks/sparse_linear.py [--repeats 300] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dyncompile.eval.timing import device_info, time_interleaved
from dyncompile.ops.sparse_linear.cpu import kernel_available, sparse_linear_cpu
from dyncompile.ops.sparse_linear.kernels import run_cpu

SHAPES = [(768, 3072), (3072, 768)]
TOKENS = [1, 4, 16]
SPARSITY = [0.25, 0.5, 0.75]


def run(repeats: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    torch.manual_seed(0)

    def op(x, wt, b, thr):  # the kernel as the gated form's op runs it
        return run_cpu(x, wt, b, thr)[0]

    rows = []
    for n_in, n_out in SHAPES:
        w = torch.randn(n_out, n_in) / n_in ** 0.5
        wt = w.t().contiguous()
        b = torch.randn(n_out)
        for n in TOKENS:
            x = torch.randn(n, n_in)
            for s in SPARSITY:
                thr = float(x.abs().flatten().quantile(s))
                torch.testing.assert_close(op(x, wt, b, thr),
                                           F.linear(x * (x.abs() >= thr), w, b),
                                           atol=1e-4, rtol=1e-4)
                fns = {"dense": lambda x=x, w=w, b=b: F.linear(x, w, b),
                       "sparse": lambda x=x, wt=wt, b=b, t=thr: op(x, wt, b, t)}
                if kernel_available():
                    # The same kernel with every row active: the other dense candidate.
                    fns["rows"] = lambda x=x, wt=wt, b=b, n=n: sparse_linear_cpu(
                        x, wt, b, -1.0, n, 1.0)
                t = time_interleaved(fns, repeats=repeats, warmup=20)
                best = min(t["dense"], t.get("rows", t["dense"]))
                union = float((x.abs() >= thr).any(0).float().mean())
                rows.append({"in": n_in, "out": n_out, "tokens": n, "sparsity": s,
                             "union_active": union, "dense_us": 1e6 * t["dense"],
                             "sparse_us": 1e6 * t["sparse"],
                             "all_rows_us": 1e6 * t.get("rows", float("nan")),
                             "speedup": t["dense"] / t["sparse"],
                             "speedup_vs_best_dense": best / t["sparse"]})
    return {"meta": {**device_info(), "repeats": repeats, "cpp_kernel": kernel_available()},
            "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = ["| in -> out | tokens | sparsity | union active | F.linear us | all rows us "
             "| sparse_linear us | vs F.linear | vs best dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['in']} -> {r['out']} | {r['tokens']} | {r['sparsity']:.2f} | "
                     f"{r['union_active']:.2f} | {r['dense_us']:.0f} | {r['all_rows_us']:.0f} | "
                     f"{r['sparse_us']:.0f} | {r['speedup']:.2f} | "
                     f"{r['speedup_vs_best_dense']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--json", default="benchmarks/results/sparse_linear.json")
    args = ap.parse_args()
    res = run(args.repeats)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    m = res["meta"]
    print(f"\n{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, {m['date']}, "
          f"C++ kernel: {m['cpp_kernel']}")


if __name__ == "__main__":
    main()
