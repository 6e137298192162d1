"""The router's CPU fast path: expert scores and dynamic-k selection (``cpu.py``).

The op that reads a model's router and tau at call time,
``dyncompile::expert_route``, is the expert form's (``dyncompile.forms.expert.ops``).
"""
