"""The call-time budget: set it three ways, read the stats, and never recompile.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/budget_runtime.py

Uses a tiny hand-written pre-norm transformer from ``dyncompile.testing.zoo``
and ``compiler="eager"`` (the rewritten graph runs without Inductor), so it
takes a few seconds on a CPU.

It passes no ``methods``, so no form rewrites the graph and every call spends
the dense FLOPs: ``stats.fraction`` stays 1.0. What this shows is the runtime
every form plugs into: the budget is runtime state (the model's
``BudgetState``), synced before every compiled-graph call and read there by the
forms' ops, which get the state's id as a graph constant; no budget value is
ever baked into a graph, so changing it compiles nothing. For a form that
really skips work as the budget falls, see ``examples/gated_decode.py``
(``methods=["gated"]``).
"""

from __future__ import annotations

import torch

import dyncompile
from dyncompile.testing import assert_matches_dense, assert_no_recompile, zoo


def main() -> None:
    entry = zoo.ZOO["prenorm"]
    model = entry.build()
    x = entry.inputs(2, 16)  # a tuple of positional args: one (B=2, S=16, D=32) tensor

    print("registered forms:", dyncompile.known_methods(), "(none used here: methods=[])")

    # Trace + compile once, on the calibration batch (no form, so nothing to calibrate).
    before = dyncompile.compile_count()
    opt = dyncompile.optimize(model, budget=0.5, compiler="eager", calibration=[x])
    compiled = dyncompile.compile_count() - before
    print(f"optimize(): compiled {compiled} graph(s); default budget {opt.budget}")
    print("after calibration:", opt.stats)

    counts = []
    with torch.no_grad():
        # 1. the model's default budget
        for b in (1.0, 0.75, 0.5, 0.25):
            opt.budget = b
            opt(*x)
            counts.append(dyncompile.compile_count())
            print(f"opt.budget = {b:<4} -> {opt.stats}")

        # 2. a scoped override for the enclosed calls (per thread / task)
        with dyncompile.budget(0.3):
            opt(*x)
            print(f"with budget(0.3)   -> {opt.stats}")
        counts.append(dyncompile.compile_count())
        opt(*x)
        print(f"after the block    -> {opt.stats}  (back to opt.budget)")

    # 3. bad values are refused before anything runs
    for bad in (0, 1.5, "half"):
        try:
            opt.budget = bad
        except ValueError as e:
            print("refused:", e)

    assert len(set(counts)) == 1, counts
    print(f"compile_count() across all budgets: {counts[0]} (unchanged: no recompiles)")

    # The same checks, as dyncompile.testing helpers for your own CI.
    opt.budget = 1.0
    worst = assert_matches_dense(model, opt, x)
    assert_no_recompile(opt, x)
    print(f"assert_matches_dense: max abs diff {worst:.2e}; assert_no_recompile: ok")

    # Plain torch.compile works too; stats of the latest call are in last_call().
    plain = torch.compile(model, backend="dyn", options={"budget": 0.5, "compiler": "eager"})
    with torch.no_grad(), dyncompile.budget(0.4):
        plain(*x)
    print("torch.compile(backend='dyn'):", dyncompile.last_call())


if __name__ == "__main__":
    main()
