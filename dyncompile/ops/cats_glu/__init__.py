"""cats_glu kernels: a GLU FFN whose up and down projections skip small gate activations.

``reference.py`` (plain torch), ``cpu.py`` (C++). The op ``dyncompile::cats_glu`` that
reads the threshold for the budget in force is the gated form's
(``dyncompile.forms.gated.ops``).
"""
