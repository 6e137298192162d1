"""Pass and PassContext: what every graph pass (and every form) builds on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from ..core.config import DynConfig
from ..core.options import NoOptions, build_options
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
    # What each form rewrote in this graph (the names its ``run`` returned).
    rewritten: dict[str, list[str]] = field(default_factory=dict)
    # Which form owns each node it rewrote: a later form leaves those nodes alone.
    claimed: dict[fx.Node, str] = field(default_factory=dict)
    # Values a form wants to see while calibrating: ``(nodes, sink)``. The backend then
    # runs calibration calls on the graph itself (eagerly) with these nodes as extra
    # outputs and hands their values to ``sink(values)`` after each call. Not honoured
    # when a form runs the graph in pieces (``program``).
    taps: list[tuple[list[fx.Node], Callable[[list[Any]], None]]] = \
        field(default_factory=list)

    def claim(self, form: str, nodes: Any) -> None:
        """Mark ``nodes`` as rewritten by ``form``: later forms must not rewrite them."""
        for n in nodes:
            if isinstance(n, fx.Node):
                self.claimed.setdefault(n, form)

    def owner(self, node: fx.Node) -> str | None:
        """The form that claimed ``node``, or None when it is free (and still in the graph)."""
        if node in self.claimed:
            return self.claimed[node]
        return "erased" if getattr(node, "_erased", False) else None


class Pass:
    """A graph pass: ``name`` and ``run(gm, ctx)``.

    A form is a Pass registered with ``dyncompile.core.registry.register_form``; its
    ``Options`` dataclass lists what ``form_options={name: {...}}`` may set
    (``dyncompile.core.options``), checked when the config is built.
    """

    name: str = "pass"
    #: What a form rewrites, in words: named in the warning when it finds none.
    looks_for: str = ""
    #: A form's options: a frozen dataclass whose fields use ``choice`` / ``checked``.
    Options: type = NoOptions
    #: A form's run-time data class (thresholds, routers...): ``runtime()`` builds an empty
    #: one, ``export()`` / ``restore(tensors, meta, model)`` save and load it.
    runtime: type | None = None
    #: True when the form needs the batch dimension traced symbolically (it changes the
    #: number of rows between pieces); ``DynModule`` then marks dim 0 of inputs dynamic.
    dynamic_batch: bool = False
    #: True when the form needs the token dimension (dim 1) traced symbolically (it changes
    #: the number of tokens between pieces); ``DynModule`` then marks it dynamic.
    dynamic_tokens: bool = False
    #: False for a form applied only when named in ``methods=[...]`` (not by a bare
    #: ``optimize()``, not in the planner's mix).
    automatic: bool = True
    #: Order among the selected forms (lower runs first), which is also who owns a block
    #: that several forms could rewrite: ``expert`` (10) takes FFN blocks, ``gated`` (20)
    #: the linears left over (attention projections included), then the forms that act on
    #: the layer stack (``token`` 80, ``early_exit`` 90), which cut the rewritten graph
    #: into pieces.
    stage: int = 50
    #: True when the form changes the model's parameters (their memory order, or a
    #: permutation that keeps the function): ``optimize()`` then works on a copy of the
    #: model unless asked to work in place.
    mutates_weights: bool = False

    def __init__(self, config: DynConfig) -> None:
        self.config = config

    @classmethod
    def parse_options(cls, raw: Any) -> Any:
        """``form_options[name]`` as this form's ``Options`` (ValueError if not allowed)."""
        return build_options(cls.Options, cls.name, raw)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[str] | None:  # pragma: no cover
        """Rewrite ``gm`` in place. A form returns the names of what it rewrote (empty: it
        found nothing to rewrite, and the pass manager warns); None says nothing."""
        raise NotImplementedError
