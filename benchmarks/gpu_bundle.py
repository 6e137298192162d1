"""Pack what the GPU run needs into one file, for a machine that lacks the MiniLM
package, the corpus or the tokenizer (a lent GPU machine with no network).

The bundle holds the MiniLM config and weights (fp16 by default, to travel in
half the bytes: the GPU run rebuilds the model from them in fp32 and compares
dyncompile against that same model, so both sides see identical weights), the
classifier's fitted head, the calibration batches, timing batches of exactly
128 tokens, and the classifier's evaluation batches with their labels.

    python benchmarks/gpu_bundle.py [--out .gpu/bundle.pt] [--weights fp16|fp32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _results import minilm_batches

from dyncompile.eval.minilm import ClassifierWorkload, tokenize

SHAPES = ((1, 128), (32, 128), (128, 128))


def build(weights: str = "fp16") -> dict:
    """The bundle as a dict of plain tensors, lists and dicts."""
    cal, timing = minilm_batches(SHAPES)
    work = ClassifierWorkload()
    clf = work.model
    dtype = torch.float16 if weights == "fp16" else torch.float32
    encoder = clf.encoder
    texts = [s.text for s in work.eval_items()]
    evals = [tokenize(work.tokenizer, texts[i:i + 32]) for i in range(0, len(texts), 32)]
    return {
        "minilm_config": encoder.config.to_dict(),
        "minilm_state": {k: v.to(dtype) if v.is_floating_point() else v
                         for k, v in encoder.state_dict().items()},
        "head_state": clf.head.state_dict(),
        "labels": list(work.labels),
        "calibration": cal,
        "timing": timing,
        "eval": evals,
        "eval_labels": work.eval_labels(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".gpu/bundle.pt")
    ap.add_argument("--weights", choices=("fp16", "fp32"), default="fp16")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build(args.weights), out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
