"""A graph cut into pieces, run piece by piece: the generic runner side.

pieces.py (a region of an FX graph as a runnable piece), direct_call.py (compiled
pieces called without Inductor's runtime wrappers), rows.py (rows leaving and
re-entering a batch between pieces, layouts kept). Forms that change the rows or
the path between layers (early exit) build on these.
"""
