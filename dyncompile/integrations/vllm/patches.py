"""What the plugin changes in vLLM, only for engines configured with dyncompile's backend.

* ``CompilationConfig.init_backend``: hands the backend vLLM's config (its options and
  Inductor options travel there).
* ``WorkerBase``: the methods the engine's ``collective_rpc`` calls by name
  (``dyncompile_set_budget``, ``dyncompile_calibration``, ``dyncompile_stats``).
* ``GPUModelRunner._prepare_inputs`` (also the CPU runner's): after vLLM lays out a
  step's tokens, the budgets its requests carry (``SamplingParams.extra_args``, see
  ``request_budget``) are noted per token row for the step's forward.
* ``dispatch_cpu_unquantized_gemm`` (CPU): vLLM prepacks each linear's weight for
  oneDNN and frees the plain weight, so its graph shows opaque ``onednn_mm`` calls;
  for a dyncompile engine the weight stays a parameter used by ``F.linear`` (in the
  input-major memory order the sparse kernels read), so the forms see linears, and
  vLLM's prepacked GEMM is kept too, for the calls that run dense (the weights are
  then held twice).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from ...ops.sparse_linear.kernels import register_dense

log = logging.getLogger("dyncompile")
_MARK = "_dyncompile_patched"


def _ours(vllm_config: Any) -> bool:
    from . import BACKEND

    cc = getattr(vllm_config, "compilation_config", None)
    return cc is not None and getattr(cc, "backend", None) == BACKEND


def _current_config() -> Any:
    try:
        from vllm.config import get_current_vllm_config

        return get_current_vllm_config()
    except Exception:
        return None


def install() -> None:
    """Patch vLLM (idempotent)."""
    from vllm.config import CompilationConfig

    if not getattr(CompilationConfig.init_backend, _MARK, False):
        original = CompilationConfig.init_backend

        @functools.wraps(original)
        def init_backend(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
            if _ours(vllm_config):
                import vllm.envs as envs

                from .worker import backend

                if envs.VLLM_USE_AOT_COMPILE:
                    raise RuntimeError(
                        "dyncompile: set VLLM_USE_AOT_COMPILE=0 (vLLM's AOT cache cannot "
                        "hold dyncompile's compiled graphs; config() sets it for engines "
                        "started after it in the same process)")
                return functools.partial(backend, vllm_config=vllm_config)
            return original(self, vllm_config, *args, **kwargs)

        setattr(init_backend, _MARK, True)
        CompilationConfig.init_backend = init_backend

    from vllm.v1.worker.worker_base import WorkerBase

    from .worker import RPC

    for name, fn in RPC.items():  # reached by name through the engine's collective_rpc
        if not hasattr(WorkerBase, name):
            setattr(WorkerBase, name, fn)

    _patch_runner()
    try:
        from vllm.model_executor.layers import utils as layer_utils
    except ImportError:  # pragma: no cover
        return
    dispatch = getattr(layer_utils, "dispatch_cpu_unquantized_gemm", None)
    if dispatch is not None and not getattr(dispatch, _MARK, False):

        @functools.wraps(dispatch)
        def keep_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
            weight = getattr(layer, "weight", None)
            if (not _ours(_current_config()) or weight is None or weight.is_meta
                    or weight.dim() != 2):
                return dispatch(layer, remove_weight)
            dispatch(layer, False)  # vLLM's own (prepacked) GEMM, the weight kept
            fast = layer.cpu_linear
            with torch.no_grad():  # input-major memory: an input channel is one row
                weight.data = weight.data.t().contiguous().t()
            register_dense(weight, lambda x, bias, fast=fast: fast(x, None, bias))
            layer.cpu_linear = _linear

        setattr(keep_linear, _MARK, True)
        layer_utils.dispatch_cpu_unquantized_gemm = keep_linear


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _patch_runner() -> None:
    """Note each step's per-request budgets, in the order vLLM lays out its tokens."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover - another vLLM layout
        log.warning("dyncompile: vLLM's model runner not found: per-request budgets off")
        return
    original = getattr(GPUModelRunner, "_prepare_inputs", None)
    if original is None or getattr(original, _MARK, False):
        return
    from .worker import ENGINE

    @functools.wraps(original)
    def prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, scheduler_output, *args, **kwargs)
        if ENGINE.states:
            req_ids = self.input_batch.req_ids
            ENGINE.note_requests(
                [_budget_of(self.requests.get(r)) for r in req_ids],
                [int(scheduler_output.num_scheduled_tokens[r]) for r in req_ids])
        return out

    setattr(prepare_inputs, _MARK, True)
    GPUModelRunner._prepare_inputs = prepare_inputs


def _budget_of(request: Any) -> Any:
    from . import REQUEST_KEY

    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REQUEST_KEY)
