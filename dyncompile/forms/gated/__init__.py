"""Form ``gated``: training-free activation sparsity for FFN and attention linears.

rewrite.py (the pass and its options), ops.py (``gated_linear``, ``cats_glu``: the
threshold read at call time), thresholds.py (the lookup the ops use),
calibration.py (magnitude samples), allocation.py (uniform and greedy budgets).
"""

from .rewrite import GatedForm, GatedOptions, GatedRuntime

__all__ = ["GatedForm", "GatedOptions", "GatedRuntime"]
