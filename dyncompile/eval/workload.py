"""Workload: a dense model, its data, and how to score a (possibly adaptive) copy of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Batch = Any  # a dict of kwargs, a tuple of args, or a tensor (see dyncompile.module.call_batch)


class Workload(ABC):
    """One model + data + metrics.

    ``quick=True`` shrinks data (and any training) to what CI can afford.
    ``metrics`` lists the quality metrics ``evaluate`` returns, primary first;
    ``higher_is_better`` says which way each one points.
    """

    name: str = "workload"
    metrics: tuple[str, ...] = ()
    higher_is_better: dict[str, bool] = {}
    #: how the planner measures quality on this model's outputs (``optimize(quality=)``)
    quality: str = "auto"

    def __init__(self, quick: bool = False, seed: int = 0) -> None:
        self.quick = quick
        self.seed = seed
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The dense model, built once (eval mode)."""
        if self._model is None:
            self._model = self.build().eval()
        return self._model

    @abstractmethod
    def build(self) -> nn.Module:
        """Build or load the dense model."""

    @abstractmethod
    def calibration(self) -> list[Batch]:
        """Batches for ``dyncompile.optimize(..., calibration=...)`` (calibration split)."""

    @abstractmethod
    def evaluate(self, model: Callable[..., Any]) -> dict[str, float]:
        """Run the evaluation split through ``model`` (called like the dense model) and
        return the quality metrics. The dense model itself scores its reference values."""

    @abstractmethod
    def timing_inputs(self) -> dict[str, Batch]:
        """Shape label (e.g. "1x128") -> one batch to time at that shape."""

    def info(self) -> dict[str, Any]:
        """Facts worth printing next to the results (sizes, baselines)."""
        return {}


def output_field(out: Any, name: str) -> torch.Tensor:
    """One tensor of a model output: the output itself if it is a tensor, else
    ``out.<name>``, ``out[name]`` (mappings) or ``out[0]``."""
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, name, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(out, Mapping):
        return out[name]
    return out[0]
