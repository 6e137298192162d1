"""Command line: ``dyncompile optimize``, ``dyncompile inspect`` and ``dyncompile bench``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


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

    from .core.config import DynConfig, default_methods
    from .eval import report
    from .eval.registry import workload_names
    from .eval.sweep import PLANNED, parse_method, run_sweep, save

    workloads = args.workloads.split(",") if args.workloads else workload_names()
    for w in workloads:
        if w not in workload_names():
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(workload_names())}")
    methods = args.methods.split(",") if args.methods else default_methods()
    for m in methods:
        try:
            form, opts = parse_method(m)
            if form == PLANNED:
                forms = opts["forms"].split("/") if "forms" in opts else default_methods()
                DynConfig(methods=forms, budget_unit=opts.get("unit", "flops"))
            else:
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
    stem = args.name or ("bench-quick" if args.quick else "bench")
    path = save(results, out / f"{stem}.json")
    images = report.plot(results, out / stem)
    print(report.tables(results))
    print(f"results: {path}; plots: {', '.join(str(p) for p in images)}", file=sys.stderr)
    if args.update_md:
        md = Path(args.update_md)
        rel = os.path.relpath(out / stem, md.parent)
        report.update_markdown(md, report.tables(results, image_dir=rel),
                               section=args.name or "bench")
        print(f"updated {md}", file=sys.stderr)
    return 0


def _minilm_job(rows: int, seed: int = 0) -> tuple[Any, list[Any], Any, Any]:
    """(model, calibration batches, embed(fn) on unseen text, a timing batch) for the real
    MiniLM: calibration sentences (the train split tops them up), 32 per batch, sorted
    by length as sentence-transformers sends them."""
    from .eval import corpus
    from .eval.minilm import _exact_length_batch, embed, load_tokenizer, tokenize
    from .testing import zoo

    tok = load_tokenizer()
    sp = corpus.splits(seed)
    texts = sorted((s.text for s in [*sp.calibration, *sp.train][:rows]), key=len)
    cal = [tokenize(tok, texts[i:i + 32]) for i in range(0, len(texts), 32)]
    order = list(range(len(cal)))
    import random

    random.Random(seed).shuffle(order)  # held-out batches of every length
    cal = [cal[i] for i in order]
    unseen = sorted((s.text for s in sp.evaluation), key=len)
    timing = _exact_length_batch(tok, [s.text for s in sp.calibration], 32, 64)
    return zoo.load_minilm(), cal, (lambda fn: embed(fn, tok, unseen)), timing


def cmd_optimize(args: argparse.Namespace) -> int:
    import statistics

    import torch

    import dyncompile

    from .eval.timing import device_info, interleaved_samples, paired_speedup

    torch.set_num_threads(args.threads or torch.get_num_threads())
    methods = args.methods.split(",") if args.methods else None
    if args.model != "minilm":
        raise SystemExit("dyncompile optimize runs on --model minilm (the real MiniLM "
                         "weights); use the Python API for your own model")
    t0 = time.perf_counter()
    print(f"loading MiniLM and {args.calibration_rows} calibration sentences ...",
          file=sys.stderr)
    model, cal, embed_unseen, timing = _minilm_job(args.calibration_rows)
    model.eval()
    kw: dict[str, Any] = {"methods": methods, "calibration": cal,
                          "budget_unit": args.unit, "confidence": args.confidence}
    if args.tolerance is not None:
        kw["tolerance"] = args.tolerance
    else:
        kw["budget"] = args.budget
    try:
        opt = dyncompile.optimize(model, **kw)
    except ValueError as e:
        raise SystemExit(f"dyncompile optimize: {e}") from None
    print(f"calibrated and planned in {time.perf_counter() - t0:.0f} s\n", file=sys.stderr)
    print(opt.report())
    print()
    print(opt.plan)
    if args.tolerance is not None:
        print(f"\n{opt.certify(args.tolerance)}")
    dense_emb = embed_unseen(model)
    spent = []

    def counted(**batch: Any) -> Any:
        out = opt(**batch)
        spent.append((opt.stats.spent_flops, opt.stats.dense_flops))
        return out

    emb = embed_unseen(counted)
    cos = float(torch.nn.functional.cosine_similarity(emb, dense_emb).mean())
    fraction = sum(s for s, _ in spent) / max(sum(d for _, d in spent), 1.0)
    compiled = torch.compile(model)
    samples = interleaved_samples({"dense": lambda: compiled(**timing),
                                   "optimized": lambda: opt(**timing)}, repeats=args.repeats)
    speed = paired_speedup(samples, "dense", "optimized")
    info = device_info()
    target = (f"tolerance {args.tolerance:g}" if args.tolerance is not None
              else f"budget {args.budget:g} ({args.unit})")
    print(f"\n{target}: unseen text ({len(dense_emb)} sentences, length-sorted batches of "
          f"32): cosine to dense {cos:.4f}, spent {fraction:.3f} of dense FLOPs; speed "
          f"{speed:.2f}x dense (torch.compile) at 32x64 tokens, median of {args.repeats} "
          f"interleaved rounds ({statistics.median(samples['optimized']) * 1e3:.1f} ms vs "
          f"{statistics.median(samples['dense']) * 1e3:.1f} ms); {info.get('cpu_model', '')}, "
          f"{torch.get_num_threads()} threads")
    if args.save:
        print(f"saved to {opt.save(args.save)}", file=sys.stderr)
    if args.plot:
        print(f"plan plotted to {opt.plot_plan(args.plot)}", file=sys.stderr)
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
    o = sub.add_parser("optimize", help="calibrate and plan every form on the real MiniLM; "
                       "print the plan, quality, spent compute and speed against dense")
    o.add_argument("--model", default="minilm")
    g = o.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, default=0.5, help="fraction of dense (default 0.5)")
    g.add_argument("--tolerance", type=float, default=None,
                   help="mean quality loss allowed (1 - cosine), certified on held-out rows")
    o.add_argument("--methods", default="", help="comma list of forms (default: all, planned)")
    o.add_argument("--unit", default="flops", choices=["flops", "time"])
    o.add_argument("--confidence", type=float, default=0.9)
    o.add_argument("--calibration-rows", type=int, default=384,
                   help="calibration sentences (a third held out to measure quality)")
    o.add_argument("--repeats", type=int, default=15, help="timing rounds")
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--save", default="", help="save the optimized model's plan to this folder")
    o.add_argument("--plot", default="", help="plot the plan to this image")
    o.set_defaults(fn=cmd_optimize)
    b = sub.add_parser("bench", help="sweep methods x budgets x workloads against dense")
    b.add_argument("--quick", action="store_true", help="tiny settings (CI)")
    b.add_argument("--workloads", default="", help="comma list: minilm,classifier,lm (all)")
    b.add_argument("--methods", default="", help="comma list of forms (all registered); options as "
                   "form:key=value+key=value, e.g. gated:glu=cats; 'planned' is every form "
                   "under one budget (planned:unit=time, planned:forms=expert/early_exit)")
    b.add_argument("--budgets", default="1.0,0.75,0.5,0.3,0.2")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--repeats", type=int, default=None, help="timing repeats per point")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-timing", action="store_true")
    b.add_argument("--update-md", default="", help="regenerate the tables in this markdown file")
    b.add_argument("--name", default="", help="name of the results (JSON, plot folder and the "
                   "markdown section between its markers; default: bench)")
    b.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        args = parser.parse_args(["inspect", *(argv or [])])
    if args.fn is cmd_inspect and (args.batch < 1 or args.seq < 1):
        parser.error("--batch and --seq must be positive")
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
