"""Pure kernels, one folder each: tensors and plain numbers in, tensors out.

Each folder has ``reference.py`` (plain torch, the oracle), a CPU kernel (``cpu.py``,
C++ built on first use), a Triton kernel (``triton.py``) where there is one, and,
where the op's meaning is the kernel alone and a pass emits it, its ``torch.library``
registration (``op.py``, with its fake kernel). Ops that read a model's runtime state
(a threshold or router for the budget in force) or report the skipped work to the
call's stats are registered by their form (``dyncompile/forms/<form>/ops.py``) on top
of these kernels. Nothing here imports any other part of dyncompile.
"""
