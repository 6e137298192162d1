"""``dyncompile::gate_threshold``: the magnitude threshold of one gated site under the budget."""
