"""The ``gated`` form on a one-token (decode-shaped) call: less compute as the budget falls.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/gated_decode.py

Optimizes a tiny random-init Llama from ``dyncompile.testing.zoo`` with
``methods=["gated"]``: every linear of its FFN and attention blocks becomes a
``dyncompile::gated_linear`` that skips the input channels with |x| below a
threshold. Thresholds are |x| quantiles recorded while the calibration batches
run through the graph. ``compiler="eager"`` runs the rewritten graph without
Inductor, so this takes seconds on a CPU (the first run also builds the C++
row-skipping kernel with ``load_inline``, which can take a minute; it is cached).

For each budget it prints, for one call on a single token:

* ``active_channels``: the mean fraction of input channels each token kept in
  the rewritten linears. It tracks the budget (per-linear sparsity is
  ``1 - budget``) but not exactly: the thresholds were fitted on the 4 x 8
  calibration batch, not on this token;
* ``spent``: FLOPs really executed / dense FLOPs of the whole model
  (``opt.stats.fraction``; the LM head and attention core stay dense);
* the relative error of the logits against the dense model.

The model is random-init, so the error says nothing about quality on a trained
model; ``dyncompile bench`` measures that on real weights.
"""

from __future__ import annotations

import torch

import dyncompile
from dyncompile.testing import zoo


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def main() -> None:
    entry = zoo.ZOO["llama"]
    model = entry.build()
    calibration = [entry.inputs(4, 8)]  # one batch: dict of input_ids / attention_mask, 4 x 8
    x = entry.inputs(1, 1)              # one token

    print("registered forms:", dyncompile.known_methods())
    opt = dyncompile.optimize(model, methods=["gated"], calibration=calibration,
                              compiler="eager")

    with torch.no_grad():
        dense = model(**x).logits
        # Warm-up: the first 1-token call compiles a graph for this shape (calibration
        # traced 4 x 8). The gated weights already went input-major, in place, after
        # the first call of the calibration graph, so this graph sees the final layout.
        with dyncompile.budget(1.0):
            opt(**x)
        before = dyncompile.compile_count()

        print(f"{'budget':>6}  {'active_channels':>15}  {'spent':>6}  {'rel. error':>10}")
        for b in (1.0, 0.75, 0.5, 0.25):
            with dyncompile.budget(b):
                out = opt(**x).logits
            s = opt.stats
            print(f"{b:>6.2f}  {s.ratio('active_channels'):>15.3f}  {s.fraction:>6.3f}  "
                  f"{rel_error(out, dense):>10.2e}")

    after = dyncompile.compile_count()
    assert after == before, (before, after)
    print(f"compile_count() across budgets: {before} -> {after} (no recompiles)")


if __name__ == "__main__":
    main()
