"""sparse_linear kernels: a linear layer that skips the weight rows of small inputs.

``reference.py`` (plain torch), ``cpu.py`` (C++ row walk), ``triton.py`` (split-K GEMV),
``kernels.py`` (the kernel chosen per call). The gated form's ops call them.
"""
