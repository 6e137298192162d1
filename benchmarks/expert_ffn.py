"""expert_ffn vs the dense FFN on CPU: what skipping unselected experts buys.

For each FFN shape (D -> H -> D, gelu, MiniLM and BERT-base sizes), expert
count, token count and fraction of experts kept per token, the dense FFN
(F.linear + gelu + F.linear, weights [out, in] contiguous: their best layout)
and dyncompile::expert_ffn (same weights, down projection input-major, random
masks with exactly that many experts per token; for one token also a
contiguous run of experts) are timed interleaved in one process, median of
repeats, 2 threads. "path" is the CPU path the op chose (cpu.choose_path) and
"spent" the fraction of the dense FLOPs it reports (1.00 on the masked dense path).

    python benchmarks/expert_ffn.py [--repeats 100] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dyncompile.forms.expert.ops  # noqa: F401  (registers the op)
from dyncompile.core import stats
from dyncompile.eval.timing import device_info, time_interleaved
from dyncompile.ops.expert_ffn.cpu import expert_ffn_cpu, kernel_available
from dyncompile.ops.expert_ffn.reference import expert_ffn_reference

SHAPES = [(384, 1536), (768, 3072)]
EXPERTS = [16, 32]
TOKENS = [1, 128, 4096]
KEEP = [0.25, 0.5, 0.75]


def _mask(n: int, experts: int, keep: float, contiguous: bool) -> torch.Tensor:
    """Exactly ``keep * experts`` experts per token: random, or one run at a random offset."""
    k = round(keep * experts)
    if contiguous:
        start = torch.randint(0, experts - k + 1, (n, 1))
        cols = torch.arange(experts)
        return (cols >= start) & (cols < start + k)
    return torch.rand(n, experts).argsort(1) < k


def _spent(fn, dense_flops: float) -> float:
    """Fraction of ``dense_flops`` that ``fn`` reports having spent."""
    token = stats.begin_call(1.0)
    stats.record_graph(dense_flops, 1.0)
    fn()
    return stats.end_call(token).fraction


def run(repeats: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    op = torch.ops.dyncompile.expert_ffn
    rows = []
    for d, hidden in SHAPES:
        w_up = torch.randn(hidden, d) / d ** 0.5
        b_up = torch.randn(hidden)
        w_down = torch.randn(d, hidden) / hidden ** 0.5
        w_down_t = w_down.t().contiguous()
        b_down = torch.randn(d)
        for n in TOKENS:
            x = torch.randn(n, d)
            reps = repeats if n < 1000 else max(3, repeats // 30)
            for experts in EXPERTS:
                for keep in KEEP:
                    for contiguous in ([False, True] if n == 1 else [False]):
                        m = _mask(n, experts, keep, contiguous)
                        args = (x, w_up, b_up, None, None, w_down_t, b_down, m, "gelu")
                        torch.testing.assert_close(op(*args), expert_ffn_reference(*args),
                                                   atol=1e-4, rtol=1e-4)
                        spent = _spent(lambda args=args: op(*args), 4.0 * n * d * hidden)
                        path = expert_ffn_cpu(x, *args[1:])[3]
                        t = time_interleaved(
                            {"dense": lambda x=x, wu=w_up, bu=b_up, wd=w_down, bd=b_down:
                                F.linear(F.gelu(F.linear(x, wu, bu)), wd, bd),
                             "expert": lambda args=args: op(*args)},
                            repeats=reps, warmup=2 if n >= 1000 else 10)
                        rows.append({"d": d, "hidden": hidden, "experts": experts, "tokens": n,
                                     "keep": keep, "contiguous": contiguous, "path": path,
                                     "spent": spent,
                                     "dense_us": 1e6 * t["dense"],
                                     "expert_us": 1e6 * t["expert"],
                                     "speedup": t["dense"] / t["expert"]})
                        print(_row(rows[-1]), flush=True)
    return {"meta": {**device_info(), "repeats": repeats, "cpp_kernel": kernel_available()},
            "rows": rows}


_HEADER = ["| D -> H | experts | tokens | keep | path | spent | dense FFN us | expert_ffn us "
           "| speedup |", "|---|---|---|---|---|---|---|---|---|"]


def _row(r: dict[str, Any]) -> str:
    keep = f"{r['keep']:.2f}" + (" contiguous" if r["contiguous"] else "")
    return (f"| {r['d']} -> {r['hidden']} | {r['experts']} | {r['tokens']} | {keep} | "
            f"{r['path']} | {r['spent']:.2f} | {r['dense_us']:.0f} | {r['expert_us']:.0f} | "
            f"{r['speedup']:.2f} |")


def table(res: dict[str, Any]) -> str:
    return "\n".join(_HEADER + [_row(r) for r in res["rows"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--json", default="benchmarks/results/expert_ffn.json")
    args = ap.parse_args()
    res = run(args.repeats)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(table(res))
    m = res["meta"]
    print(f"\n{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, {m['date']}, "
          f"C++ kernel: {m['cpp_kernel']}")


if __name__ == "__main__":
    main()
