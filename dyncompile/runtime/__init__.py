"""Call-side runtime: budget state, statistics, the optimized module."""

from .budget import BudgetState, budget, current_budget
from .stats import CallStats, compile_count

__all__ = ["BudgetState", "CallStats", "budget", "compile_count", "current_budget"]
