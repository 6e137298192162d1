"""Form ``early_exit``: confidence exits between layers, rows leaving the batch.

rewrite.py (the pass: cut the graph at the layer boundaries; options; runtime),
checks.py (exit checks fused into the layer pieces), program.py (the runner),
fast.py (its straight-line path while no row leaves), fit.py (threshold curves).
"""

from .rewrite import EarlyExitForm, EarlyExitOptions, ExitRuntime

__all__ = ["EarlyExitForm", "EarlyExitOptions", "ExitRuntime"]
