"""Form ``token``: fewer tokens through the deep layers.

rewrite.py (the pass: cut the residual stream into one piece per residual block,
give attention pieces a proportional-attention bias; options; runtime),
program.py (the runner: merges similar tokens after each attention block and
unmerges them before the head), schedule.py (the budget as merges per block).
"""

from .rewrite import TokenForm, TokenOptions, TokenRuntime

__all__ = ["TokenForm", "TokenOptions", "TokenRuntime"]
