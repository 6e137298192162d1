"""Train (or find cached) the byte-level Llama LM of the "lm" workload and report it.

The model, its data and its training are defined in ``dyncompile.eval.lm``; the
result is cached in ``$DYNCOMPILE_CACHE/lm/<key>/`` (default ``~/.cache/dyncompile``),
so a second run only loads and evaluates it. Prints parameters, steps, training
time, and the per-byte perplexity on the evaluation split next to an add-one
smoothed unigram byte model fitted on the same training bytes.

Usage::

    python benchmarks/train_lm.py [--seed 0] [--quick] [--retrain] [--decode]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while waiting slow training down several times over when
# other jobs share the two cores; waiting passively costs next to nothing when idle.
os.environ.setdefault("GOMP_SPINCOUNT", "0")

import torch  # noqa: E402

from dyncompile.eval import lm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Train if needed, evaluate, print the figures; return the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps (for tests)")
    p.add_argument("--retrain", action="store_true", help="train even if a cached model exists")
    p.add_argument("--minutes", type=float, default=12.0,
                   help="time budget to warn against (the step count is fixed)")
    p.add_argument("--decode", action="store_true",
                   help="also measure greedy decode tokens/s with the KV cache")
    p.add_argument("--json", help="write the summary to this file")
    args = p.parse_args(argv)

    path = lm.model_dir(args.seed, args.quick)
    cached = (path / "model.safetensors").exists() and not args.retrain
    if cached:
        print(f"cached: {path}")
    else:
        print(f"training -> {path}")
        lm.train_lm(seed=args.seed, minutes=args.minutes, quick=args.quick)
    torch.set_num_threads(lm.THREADS)
    w = lm.LMWorkload(quick=args.quick, seed=args.seed)
    t0 = time.perf_counter()
    metrics = w.evaluate(w.model)
    eval_s = time.perf_counter() - t0
    info = w.info()
    train = info["train"]
    uni = info["unigram_perplexity"]
    ppl = metrics["perplexity"]
    summary = {
        "path": str(path), "cached": cached, "params": info["params"],
        "steps": train["steps"], "tokens_seen": train["tokens_seen"],
        "train_seconds": train["train_seconds"], "final_train_loss": train["final_train_loss"],
        "data_bytes": train["data_bytes"], "eval_bytes": info["eval_bytes"],
        "perplexity": ppl, "bits_per_byte": metrics["bits_per_byte"],
        "unigram_perplexity": uni, "ratio_to_unigram": ppl / uni, "eval_seconds": eval_s,
    }
    if args.decode:
        summary["decode_tokens_per_s"] = lm.decode_tokens_per_s(w.model)

    print(f"params             {summary['params']:,}")
    print(f"training data      {summary['data_bytes']:,} bytes")
    print(f"steps              {summary['steps']} "
          f"({summary['tokens_seen']:,} tokens, {train['spec']['batch']}x{train['spec']['seq']})")
    print(f"train time         {summary['train_seconds'] / 60:.1f} min "
          f"({train['steps_per_s']:.2f} steps/s)")
    print(f"final train loss   {summary['final_train_loss']:.3f} nats/byte")
    print(f"eval bytes         {summary['eval_bytes']:,}")
    print(f"eval perplexity    {ppl:.3f} per byte ({metrics['bits_per_byte']:.3f} bits/byte)")
    print(f"unigram perplexity {uni:.3f} per byte")
    print(f"LM / unigram       {ppl / uni:.1%}")
    if args.decode:
        print(f"decode             {summary['decode_tokens_per_s']:.1f} tokens/s "
              "(greedy, KV cache, batch 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
