"""``dyncompile::gated_linear``: sparse_linear, threshold read from the budget at run time."""
