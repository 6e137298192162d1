"""Planning: one budget or one quality tolerance turned into every form's knob.

See :mod:`dyncompile.plan.frontier` (the search and the plan),
:mod:`dyncompile.plan.quality` (the loss per row) and :mod:`dyncompile.plan.bound`
(the distribution-free bound a tolerance is certified with).
"""

from .frontier import GRID, UNITS, Certificate, Measurement, Plan, Point, search

__all__ = ["GRID", "UNITS", "Certificate", "Measurement", "Plan", "Point", "search"]
