"""Command line: ``dyncompile inspect [--model NAME] [--batch B] [--seq S]``."""

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
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        args = parser.parse_args(["inspect", *(argv or [])])
    if args.batch < 1 or args.seq < 1:
        parser.error("--batch and --seq must be positive")
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
