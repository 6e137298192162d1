"""Custom ops, one folder each: reference.py (plain torch), op.py (torch.library
registration: CPU kernel, fake kernel, CUDA kernel), triton.py (@triton.jit kernels).

Importing ``dyncompile.ops.<name>.op`` registers ``torch.ops.dyncompile.<name>``.
"""
