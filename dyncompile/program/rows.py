"""Rows leaving and re-entering a batch between the pieces of a graph.

A runtime that changes the rows of a batch between pieces (rows that leave early,
rows routed around a layer) selects them with :func:`take_rows` /
:func:`select_rows`, which keep each value's memory layout, so a piece compiled
for row-major inputs can skip Inductor's per-call input checks
(:func:`fixed_layouts`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import fx

from ..passes.graph_utils import is_param


def node_example(n: fx.Node) -> Any:
    """The value dynamo recorded for ``n`` (a fake tensor, or a plain value)."""
    return n.meta.get("example_value", n.meta.get("val"))


def row_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (a real or fake tensor, sizes possibly symbolic) is known to be laid
    out row-major contiguous for every value of its symbols."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    expected: Any = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        if not (statically_known_true(size == 1) or statically_known_true(stride == expected)):
            return False
        expected = expected * size
    return True


def fixed_layouts(inputs: list[fx.Node], example: list[Any] | None = None) -> bool:
    """Whether a piece reading these graph values can be compiled without Inductor's
    per-call input checks (``size_asserts``; at one 128-token row their Python cost was
    about 1% of the forward over a model's pieces).

    Dynamo's guards check the graph's own inputs (parameters among them) and Inductor
    gives a piece's outputs the strides the traced graph had (``keep_output_stride``).
    What else a piece reads the runner makes: rows selected out of a batch
    (:func:`select_rows`, which keeps the stride order), a frozen or adapted stream,
    zeros. Those come out row-major when the value they replace was, so the checks are
    left out only where every value that is not a parameter is row-major (``example``:
    the values the piece is compiled for, if not those dynamo recorded)."""
    example = [node_example(n) for n in inputs] if example is None else example
    for n, v in zip(inputs, example):
        if isinstance(v, torch.Tensor) and not is_param(n) and not row_major(v):
            return False
    return True


def select_rows(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v.index_select(0, idx)`` laid out like ``v`` (same stride order): compiled pieces
    check their inputs' strides."""
    if v.is_contiguous() or v.dim() < 2:
        return v.index_select(0, idx)
    order = sorted(range(v.dim()), key=lambda d: (-v.stride(d), d))
    shape = list(v.shape)
    shape[0] = idx.numel()
    out = v.new_empty([shape[d] for d in order]).permute(
        *sorted(range(v.dim()), key=order.__getitem__))
    out.copy_(v.index_select(0, idx))
    return out


def take_rows(env: dict[fx.Node, Any], batch: Collection[fx.Node],
              batch_ints: Collection[fx.Node], idx: torch.Tensor) -> dict[fx.Node, Any]:
    """The environment of the rows ``idx`` of a batch: values of ``batch`` nodes (dim 0 is
    the batch) select those rows, ``batch_ints`` (the batch size as a number) become their
    count, everything else is shared."""
    out = {}
    for n, v in env.items():
        if n in batch and isinstance(v, torch.Tensor):
            out[n] = select_rows(v, idx)
        elif n in batch_ints:
            out[n] = int(idx.numel())
        else:
            out[n] = v
    return out
