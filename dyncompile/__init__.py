"""dyncompile: adaptive compute for trained models, as a torch.compile backend.

    opt = dyncompile.optimize(model, budget=0.5, calibration=batches)   # every form, planned
    print(opt.plan)                                                      # the frontier
    torch.compile(model, backend="dyn", options={"budget": 0.5})
    with dyncompile.budget(0.3):
        out = opt(**inputs)
    with dyncompile.tolerance(0.02):         # the cheapest certified point
        out = opt(**inputs)
"""

from .api import InspectReport, inspect, optimize
from .core.budget import budget, tolerance
from .core.config import DynConfig, default_methods, known_methods
from .core.errors import TraceError
from .core.stats import CallStats, compile_count, last_call
from .module import DynModule, load

__version__ = "0.1.0"

__all__ = [
    "CallStats",
    "DynConfig",
    "DynModule",
    "InspectReport",
    "TraceError",
    "__version__",
    "budget",
    "compile_count",
    "inspect",
    "default_methods",
    "known_methods",
    "last_call",
    "load",
    "optimize",
    "tolerance",
]
