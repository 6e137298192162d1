"""The blocks the ``block`` allocation measures: a region of the rewritten graph from
its sites' inputs to its output, recorded inputs and the dense output to compare with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from ...core import stats as _stats
from ...passes.graph_utils import is_param, mutates

# Recorded token rows per block: whole calls are kept (attention needs its sequences)
# until this many rows, at least one call.
BLOCK_ROWS = 512


def _static(n: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``n`` is computed from trained parameters alone (``weight.t()``...)."""
    if n not in memo:
        if n.op == "get_attr" or is_param(n):
            memo[n] = True
        elif n.op in ("call_function", "call_method") and n.all_input_nodes:
            memo[n] = all(_static(u, memo) for u in n.all_input_nodes)
        else:
            memo[n] = False
    return memo[n]


def block_region(g: nx.DiGraph, seeds: list[fx.Node], output: fx.Node
                 ) -> list[fx.Node] | None:
    """The nodes computing ``output`` from ``seeds`` (graph order; ``g`` is the graph's
    ``to_nx`` view): those that depend on a seed and that ``output`` depends on, with
    what they compute from parameters alone (so only activations are recorded). None
    when the region writes into a tensor in place (re-running it would change its own
    recorded inputs)."""
    ahead = set().union(*(nx.descendants(g, s) for s in seeds))
    behind = nx.ancestors(g, output) | {output}
    memo: dict[fx.Node, bool] = {}
    region = [n for n in output.graph.nodes if n in behind
              and n.op not in ("placeholder", "get_attr") and (n in ahead or _static(n, memo))]
    if any(mutates(n) for n in region):
        return None
    return region


@dataclass(eq=False)
class BlockProbe:
    """One block: its sites, its region as a callable over ``inputs``, recorded calls."""

    sites: list[str]
    run: Callable[..., Any]
    calls: list[list[Any]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    rows: int = 0

    def record(self, values: list[Any]) -> None:
        """Keep one calibration call's inputs of the block and its dense output (last)."""
        if self.calls and self.rows >= BLOCK_ROWS:
            return
        *inputs, target = values
        self.calls.append([v if isinstance(v, torch.nn.Parameter) else
                           v.detach().clone() if isinstance(v, torch.Tensor) else v
                           for v in inputs])
        self.targets.append(target.detach().float().clone())
        first = next(v for v in inputs if isinstance(v, torch.Tensor)
                     and not isinstance(v, torch.nn.Parameter))
        self.rows += first.numel() // max(first.shape[-1], 1)

    def error(self) -> float:
        """Relative squared error of the block's output over the recorded calls, with
        the thresholds in force now."""
        num = den = 0.0
        with torch.no_grad(), _stats.muted():
            for inputs, target in zip(self.calls, self.targets):
                (y,) = self.run(*inputs)
                num += float((y.float() - target).square().sum())
                den += float(target.square().sum())
        return num / den if den > 0 else 0.0
