"""``dyncompile::cats_glu``: a GLU FFN whose up and down projections skip small gate activations."""
