"""Workload names for ``dyncompile bench --workloads``."""

from __future__ import annotations

from .workload import Workload


def workload_names() -> list[str]:
    return ["minilm", "classifier", "lm"]


def make_workload(name: str, quick: bool = False, seed: int = 0) -> Workload:
    """Build a workload by name (imports lazily: each pulls in its own model code)."""
    if name == "minilm":
        from .minilm import EmbeddingWorkload

        return EmbeddingWorkload(quick=quick, seed=seed)
    if name == "classifier":
        from .minilm import ClassifierWorkload

        return ClassifierWorkload(quick=quick, seed=seed)
    if name == "lm":
        from .lm import LMWorkload

        return LMWorkload(quick=quick, seed=seed)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(workload_names())}")
