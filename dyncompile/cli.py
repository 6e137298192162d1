"""Command line: ``dyncompile inspect [--model NAME]`` and ``dyncompile bench [--quick]``."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _load(name: str, batch: int, seq: int):
    from .testing import zoo

    if name == "minilm":
        return zoo.load_minilm(), zoo.minilm_inputs(batch, seq)
    if name not in zoo.ZOO:
        known = ", ".join(["minilm", *zoo.ZOO])
        raise SystemExit(f"unknown model {name!r}; built-in models: {known}")
    entry = zoo.ZOO[name]
    return entry.build(), entry.inputs(batch, seq)


def cmd_inspect(args: argparse.Namespace) -> int:
    import dyncompile

    t0 = time.perf_counter()
    print(f"tracing {args.model} at batch={args.batch}, seq={args.seq} ...", file=sys.stderr)
    model, inputs = _load(args.model, args.batch, args.seq)
    report = dyncompile.inspect(model, inputs)
    print(report)
    print(f"\n(inspected in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .core.config import DynConfig, known_methods
    from .eval import report
    from .eval.registry import workload_names
    from .eval.sweep import parse_method, run_sweep, save

    workloads = args.workloads.split(",") if args.workloads else workload_names()
    for w in workloads:
        if w not in workload_names():
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(workload_names())}")
    methods = args.methods.split(",") if args.methods else known_methods()
    for m in methods:
        try:
            form, opts = parse_method(m)
            DynConfig(methods=[form], form_options={form: opts} if opts else {})
        except ValueError as e:
            raise SystemExit(f"bad method {m!r}: {e}") from None
    try:
        budgets = tuple(float(b) for b in args.budgets.split(","))
    except ValueError:
        raise SystemExit(f"--budgets must be numbers in (0, 1], got {args.budgets!r}") from None
    if any(not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"--budgets must be numbers in (0, 1], got {args.budgets!r}")
    out = Path(args.out)
    results = run_sweep(workloads, methods, budgets, quick=args.quick,
                        timing=not args.no_timing, repeats=args.repeats, seed=args.seed)
    stem = "bench-quick" if args.quick else "bench"
    path = save(results, out / f"{stem}.json")
    images = report.plot(results, out / stem)
    print(report.tables(results))
    print(f"results: {path}; plots: {', '.join(str(p) for p in images)}", file=sys.stderr)
    if args.update_md:
        md = Path(args.update_md)
        rel = os.path.relpath(out / stem, md.parent)
        report.update_markdown(md, report.tables(results, image_dir=rel))
        print(f"updated {md}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="dyncompile", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("inspect", help="print the FFN / attention / residual blocks of a model")
    p.add_argument("--model", default="minilm",
                   help="minilm (real all-MiniLM-L6-v2 weights, default) or a built-in tiny "
                        "model: gpt2, llama, qwen2, mistral, bert, roberta, distilbert, t5, vit, "
                        "encoder-layer, mlp, prenorm ...")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.set_defaults(fn=cmd_inspect)
    b = sub.add_parser("bench", help="sweep methods x budgets x workloads against dense")
    b.add_argument("--quick", action="store_true", help="tiny settings (CI)")
    b.add_argument("--workloads", default="", help="comma list: minilm,classifier,lm (all)")
    b.add_argument("--methods", default="", help="comma list of forms (all registered); options as "
                   "form:key=value+key=value, e.g. gated:glu=cats")
    b.add_argument("--budgets", default="1.0,0.75,0.5,0.3,0.2")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--repeats", type=int, default=None, help="timing repeats per point")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-timing", action="store_true")
    b.add_argument("--update-md", default="", help="regenerate the tables in this markdown file")
    b.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        args = parser.parse_args(["inspect", *(argv or [])])
    if args.fn is cmd_inspect and (args.batch < 1 or args.seq < 1):
        parser.error("--batch and --seq must be positive")
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
