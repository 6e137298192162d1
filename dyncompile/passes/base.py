"""Pass and PassContext: what every graph pass (and every form) builds on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from ..config import DynConfig
from .detect import BlockSet


@dataclass
class PassContext:
    """What passes share while they run on one graph."""

    config: DynConfig
    example_inputs: list[Any]
    state: Any = None
    blocks: BlockSet | None = None
    log: list[str] = field(default_factory=list)
    # Run once after the compiled graph's first call (e.g. weight layout changes: doing
    # them while dynamo is still checking this frame's guards would fail them).
    after_first_call: list[Callable[[], None]] = field(default_factory=list)
    # A form that runs the graph itself (cut into pieces) sets this: a callable over the
    # graph's inputs, with ``compile(compiler)``; the backend then returns it.
    program: Any = None


def positive_int(value: Any) -> str | None:
    """Option rule: a positive int, or None for the default."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return "must be a positive int"


class Pass:
    """A graph pass: ``name``, ``version`` and ``run(gm, ctx)``.

    ``uuid()`` feeds Inductor's FX graph cache key, so a change of pass version
    or options never reuses a stale compiled graph.
    """

    name: str = "pass"
    version: str = "1"
    #: A form's options: a tuple of allowed values (first = default), a function
    #: returning a complaint (or None) for a value, or None (anything); checked by DynConfig.
    options: dict[str, Any] = {}
    #: A form's run-time data class (thresholds, routers...): ``runtime()`` builds an empty
    #: one, ``export()`` / ``restore(tensors, meta, model)`` save and load it.
    runtime: type | None = None
    #: True when the form needs the batch dimension traced symbolically (it changes the
    #: number of rows between pieces); ``DynModule`` then marks dim 0 of inputs dynamic.
    dynamic_batch: bool = False

    def __init__(self, config: DynConfig) -> None:
        self.config = config

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:  # pragma: no cover
        raise NotImplementedError

    def uuid(self) -> str:
        return f"{self.name}:{self.version}:{self.config.uuid()}"
