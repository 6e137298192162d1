"""expert_ffn kernels: an FFN split into experts that computes only the selected ones.

``reference.py`` (plain torch), ``cpu.py`` (C++ and torch paths), ``triton.py``.
The op ``dyncompile::expert_ffn`` that reports the skipped work is registered by the
expert form (``dyncompile.forms.expert.ops``).
"""
