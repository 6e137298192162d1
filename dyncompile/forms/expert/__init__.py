"""Form ``expert``: every FFN becomes a router plus a dynamic-k mixture of experts.

rewrite.py (the pass, its options and runtime), fit.py (clustering, router training,
compute curves), ops.py (``expert_route`` and ``expert_ffn``).
"""

from .rewrite import ExpertForm, ExpertOptions, ExpertRuntime

__all__ = ["ExpertForm", "ExpertOptions", "ExpertRuntime"]
