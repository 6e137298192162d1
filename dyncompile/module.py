"""DynModule: the optimized model returned by ``dyncompile.optimize``."""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import logging
import types
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import stats as _stats
from .core.budget import BudgetState, validate_tolerance
from .core.config import DynConfig, validate_budget
from .core.errors import trace_error
from .plan import Certificate, Measurement, Plan, search
from .plan.frontier import path_length
from .plan.quality import row_losses

log = logging.getLogger("dyncompile")


class DynModule(nn.Module):
    """A model compiled by the ``dyn`` backend, with a call-time budget.

    Call it like the original model. ``opt.budget = 0.5`` sets the default
    budget; ``with dyncompile.budget(0.3):`` overrides it for enclosed calls.
    ``opt.stats`` holds what the last call spent.
    """

    def __init__(self, model: nn.Module, config: DynConfig, dynamic: bool | None = None) -> None:
        super().__init__()
        from .backend import dyn_backend

        self.model = model
        self.config = config
        self.state = BudgetState(config.budget)
        self.state.auto_calibrate = False
        self.planned = True
        self.quality: Any = "auto"  # how the planner measures quality (see optimize())
        self.stats = _stats.CallStats(budget=config.budget)
        self._traced = False
        self._dynamic = dynamic
        self._compiled_forward: Any = None
        from .core.registry import forms

        self._mark_batch = any(forms()[m].dynamic_batch for m in config.methods)
        self._mark_tokens = any(forms()[m].dynamic_tokens for m in config.methods)
        self._warned_eager = False
        self._calibrate_on_first_call = False
        options: dict[str, Any] = {**_options(config), "state": self.state}
        # Kept out of the module tree so state_dict() holds each weight once. Compiled
        # through an entry function of its own, so this model's graphs are cached on its
        # own code object and never count against another model's recompile limit.
        object.__setattr__(self, "_compiled", torch.compile(
            own_entry(model), backend=dyn_backend, options=options, dynamic=dynamic))
        try:
            self.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover
            pass

    def save(self, path: Any) -> Any:
        """Write what calibration fitted (and the config) to the folder ``path``.

        ``dyncompile.load(model, path)`` rebuilds the same optimized model.
        """
        return save(self, path)

    def report(self) -> RewriteReport:
        """What each selected form rewrote in the graphs compiled so far (after a call)."""
        from .core.registry import forms

        registry = forms()
        return RewriteReport({m: list(self.state.rewritten.get(m, {})) for m in
                              self.config.methods},
                             {m: registry[m].looks_for for m in self.config.methods})

    @property
    def budget(self) -> float:
        """Default budget of this model's calls, a fraction of dense FLOPs in (0, 1]."""
        return self.state.default

    @budget.setter
    def budget(self, value: float) -> None:
        self.state.default = validate_budget(value)
        self.state.tolerance = None

    @property
    def plan(self) -> Plan | None:
        """The planned frontier (``print(opt.plan)`` shows it as a table), or None before
        calibration."""
        return self.state.plan

    @property
    def tolerance(self) -> float | None:
        """Default quality tolerance of this model's calls (None: ``budget`` rules). Setting
        it certifies it on the held-out calibration rows (ValueError when they cannot)."""
        return self.state.tolerance

    @tolerance.setter
    def tolerance(self, value: float | None) -> None:
        if value is None:
            self.state.tolerance = None
            return
        value = validate_tolerance(value)
        self.certify(value)
        self.state.tolerance = value

    def certify(self, tolerance: float, confidence: float | None = None) -> Certificate:
        """The cheapest planned point whose mean quality loss is certified within
        ``tolerance`` on the held-out calibration rows, with the bound and row count."""
        if self.state.plan is None:
            raise ValueError("dyncompile: a tolerance needs a plan: calibrate first "
                             "(optimize(..., calibration=batches))")
        return self.state.plan.certify(validate_tolerance(tolerance), confidence)

    def plot_plan(self, path: Any) -> Path:
        """Save a plot of the planned frontier against each form alone to ``path``."""
        if self.state.plan is None:
            raise ValueError("dyncompile: no plan yet: calibrate first")
        return self.state.plan.plot(path)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._calibrate_on_first_call:
            self._calibrate_on_first_call = False
            warnings.warn(
                "dyncompile: no calibration data given: the forms are calibrated and "
                "planned on the first call's inputs (pass calibration=[batches like your "
                "inputs] to optimize() for better plans)", UserWarning, stacklevel=2)
            self.calibrate([Call(args, kwargs)], progress=False, plan=self.planned)
        with self.state.lock:
            self.state.call_tokens = call_tokens(args, kwargs)
            token = _stats.begin_call(self.state.sync())
            try:
                out = self._call(*args, **kwargs)
            finally:
                self.state.call_tokens = None
                self.stats = _stats.end_call(token)
            if self.stats.graphs == 0 and not self._warned_eager:
                self._warned_eager = True
                warnings.warn(
                    f"dyncompile: a call of {type(self.model).__name__} ran no compiled graph: "
                    f"dynamo fell back to eager (recompile limit reached? see "
                    f"torch._dynamo.config.recompile_limit); forms are not applied to such "
                    f"calls", RuntimeWarning, stacklevel=2)
            return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate()`` (Hugging Face), every step through the
        optimized graphs under the budget in force; ``opt.stats`` sums all steps."""
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"{type(self.model).__name__} has no generate()")
        if self._compiled_forward is None:
            from .backend import dyn_backend

            options = {**_options(self.config), "state": self.state}
            compiled = torch.compile(own_entry(self.model.forward), backend=dyn_backend,
                                     options=options, dynamic=self._dynamic)
            state, mark = self.state, self._mark_batch or self._mark_tokens

            def forward(*a: Any, **k: Any) -> Any:  # each step: its size class
                if mark:
                    _mark_batch_dynamic([*a, *k.values()], self._mark_tokens)
                state.call_tokens = call_tokens(a, k)
                return compiled(*a, **k)

            self._compiled_forward = forward
        had = "forward" in vars(self.model)
        saved = vars(self.model).get("forward")
        with self.state.lock:
            token = _stats.begin_call(self.state.sync())
            self.model.forward = self._compiled_forward
            try:
                return self.model.generate(*args, **kwargs)
            finally:
                if had:
                    self.model.forward = saved
                else:
                    del self.model.forward
                self.state.call_tokens = None
                self.stats = _stats.end_call(token)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._mark_batch or self._mark_tokens:
            _mark_batch_dynamic([*args, *kwargs.values()], self._mark_tokens)
        if self._traced:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:
            if _is_dynamo_error(e):
                raise trace_error(self.model, e) from e
            raise
        self._traced = True
        return out

    def calibrate(self, batches: Iterable[Any], progress: bool = True,
                  plan: bool = True) -> None:
        """Run calibration batches (dicts of kwargs, tuples of args, or tensors) through the
        compiled graphs; the forms' ops record what they need and fit their tables. Then,
        with ``plan``, measure the forms and build the plan that turns a budget or a
        tolerance into every form's knob (``opt.plan``). With two batches or more, the
        last third of them (at least one) is held out: the forms never fit on it, and
        the plan's quality is measured and certified on it."""
        from tqdm.auto import tqdm

        batches = check_batches(batches)
        self._calibrate_on_first_call = False
        fit, test = split_batches(batches)
        show = progress and bool(self.config.methods)
        self.state.calibrating = True
        try:
            for batch in tqdm(fit, desc="calibrating", disable=not show or len(fit) < 2,
                              leave=False):
                with torch.no_grad():
                    call_batch(self, batch)
        finally:
            self.state.calibrating = False
        self.state.finalize_calibration()

        def run_at(value: float) -> None:
            with torch.no_grad():
                for batch in fit:
                    call_batch(self, batch)

        self.state.refine_calibration(run_at)
        planned = [m for m in self.config.methods if m in self.state.forms]
        if plan and planned:
            self.state.plan = make_plan(self, planned, fit, test, held_out=test is not fit,
                                        progress=show)

class RewriteReport:
    """``opt.report()``: per selected form, the names of what it rewrote (sites, FFN blocks,
    exits); ``str()`` gives a table."""

    def __init__(self, rewritten: dict[str, list[str]], looks_for: dict[str, str]) -> None:
        self.rewritten = rewritten
        self.looks_for = looks_for

    def __str__(self) -> str:
        if not self.rewritten:
            return "no form selected (methods=[]): nothing rewritten"
        lines = []
        for form, names in self.rewritten.items():
            if names:
                shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)"
                                                if len(names) > 4 else "")
                lines.append(f"{form}: {len(names)} rewritten: {shown}")
            else:
                lines.append(f"{form}: nothing rewritten (looks for "
                             f"{self.looks_for.get(form) or 'its blocks'})")
        return "\n".join(lines)

    __repr__ = __str__


_entries = itertools.count()


def own_entry(fn: Any) -> Any:
    """``fn`` behind a function with a code object of its own. Dynamo caches compiled
    graphs per code object and stops compiling one after ``recompile_limit`` entries; the
    forward of every instance of a model class shares one code object, so without this
    the ninth optimized model of a class would silently run eager."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    code = call.__code__.replace(co_name=f"dyncompile_entry_{next(_entries)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def _mark_batch_dynamic(values: list[Any], tokens: bool = False) -> None:
    """Let dynamo trace dim 0 (the batch) of the input tensors as a symbol: tensors given
    directly, and tensors held in lists, dicts or objects (a KV cache) whose dim 0 equals
    the first input tensor's. ``tokens``: dim 1 too (the first input's token count, on
    the tensors given directly whose dim 1 equals it)."""
    direct = [v for v in values if isinstance(v, torch.Tensor) and v.dim() >= 1]
    if tokens and direct and direct[0].dim() >= 2 and direct[0].shape[1] > 1:
        for t in direct:
            if t.dim() >= 2 and t.shape[1] == direct[0].shape[1]:
                torch._dynamo.maybe_mark_dynamic(t, 1)
    if direct and direct[0].shape[0] < 2:
        return  # a batch of one: nothing to mark (the common decoding case)
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(v: Any, depth: int) -> None:
        if id(v) in seen or depth > 4:
            return
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            tensors.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x, depth + 1)
        elif hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, type)):
            for x in vars(v).values():
                walk(x, depth + 1)

    for v in values:
        walk(v, 0)
    first = next((t for t in tensors if t.dim() >= 1), None)
    if first is None or first.shape[0] < 2:
        return
    for t in tensors:
        if t.dim() >= 1 and t.shape[0] == first.shape[0]:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def check_batches(batches: Any) -> list[Any]:
    """The calibration batches as a list; ValueError for an empty set or a batch that is
    not a dict of keyword arguments, a tuple / list of positional ones, or a tensor."""
    if isinstance(batches, (torch.Tensor, dict)):
        raise ValueError("calibration must be a list of batches (each a dict of keyword "
                         "arguments, a tuple of positional ones, or a tensor), not one "
                         f"{type(batches).__name__}: wrap it as [batch]")
    try:
        batches = list(batches)
    except TypeError:
        raise ValueError(f"calibration must be a list of batches, got "
                         f"{type(batches).__name__}") from None
    if not batches:
        raise ValueError("calibration is empty: give at least one batch shaped like the "
                         "inputs the model will see (the forms fit their thresholds, routers "
                         "and exits on it)")
    for i, b in enumerate(batches):
        if not isinstance(b, (dict, tuple, list, torch.Tensor, Call)):
            raise ValueError(f"calibration batch {i} is a {type(b).__name__}: each batch "
                             f"must be a dict of keyword arguments, a tuple of positional "
                             f"ones, or a tensor")
    return batches


class Call:
    """One call's positional and keyword arguments, as a calibration batch."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs


def split_batches(batches: list[Any]) -> tuple[list[Any], list[Any]]:
    """(fitting batches, held-out batches): the last third (at least one) is held out
    when there are two batches or more; else both are the same list."""
    if len(batches) < 2:
        return batches, batches
    held = max(1, len(batches) // 3)
    return batches[:-held], batches[-held:]


def make_plan(opt: DynModule, forms: list[str], fit: list[Any], test: list[Any],
              held_out: bool, progress: bool) -> Plan:
    """Measure ``forms`` on the calibration batches and search the plan (see
    :func:`dyncompile.plan.search`)."""
    import time

    from tqdm.auto import tqdm

    state = opt.state
    quality = opt.quality

    per_token = False  # the small size class: FLOPs as if each token row ran alone

    def run(batches: list[Any], knobs: dict[str, float]) -> tuple[list[Any], float, float]:
        outs, dense, spent, seconds = [], 0.0, 0.0, 0.0
        with torch.no_grad():
            for b in batches:
                start = time.perf_counter()
                out = state.run_forced(knobs, call_batch, opt, b)
                seconds += time.perf_counter() - start
                # a copy: a runner may reuse its output buffers
                outs.append(_detached(out, callable(quality)))
                dense += opt.stats.dense_flops
                spent += opt.stats.token_spent_flops if per_token else opt.stats.spent_flops
        return outs, (spent / dense if dense else 1.0), seconds

    def plan_on(fit: list[Any], test: list[Any], bar: Any) -> Plan:
        fit = fit[:4] if len(fit) > 4 else fit  # a few batches rank the steps
        for f in forms:  # a form's first sparse call does one-time work: not timed
            run(fit[:1], {f: 0.5})
        refs: dict[int, tuple[list[Any], float]] = {}
        for key, batches in ((0, fit), (1, test)):
            run(batches, {})  # warm: the first call of a shape may compile
            times = []
            for _ in range(3):
                outs, _, seconds = run(batches, {})
                times.append(seconds)
            refs[key] = (outs, sorted(times)[1])

        def measure(key: int, batches: list[Any]) -> Any:
            def go(knobs: dict[str, float]) -> Measurement:
                outs, flops, seconds = run(batches, knobs)
                ref, dense_time = refs[key]
                losses = torch.cat([row_losses(r, o, _mask(b), quality) for r, o, b in
                                    zip(ref, outs, batches)]).tolist()
                return Measurement(flops, seconds / dense_time if dense_time else 1.0, losses)
            return go

        plan = search(forms, measure(0, fit), measure(1, test), unit=opt.config.budget_unit,
                      held_out=held_out, progress=bar.update)
        plan.confidence = getattr(state, "confidence", plan.confidence)
        return plan

    # Decode-sized pieces of the batches (their own size class), when the batches are
    # larger: what a form saves on them can differ (see plan.frontier.SMALL_CALL_TOKENS).
    small_fit = [p for b in fit[:4] for p in small_pieces(b)]
    small_test = [p for b in test[:4] for p in small_pieces(b)] if held_out else small_fit
    sized = bool(small_fit) and bool(small_test)
    bar = tqdm(total=path_length(len(forms)) * (2 if sized else 1), desc="planning",
               disable=not progress, leave=False)
    try:
        plan = plan_on(fit, test, bar)
        if sized:  # decode steps run one token per row: FLOPs as if each row ran alone
            per_token = True
            plan.small = plan_on(small_fit, small_test, bar)
        return plan
    finally:
        bar.close()


#: Decode-sized pieces taken from each calibration batch for the small size class:
#: this many rows, this many leading tokens each.
SMALL_PIECE_ROWS, SMALL_PIECE_TOKENS = 4, 8


def _token_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor that carries a call's tokens: ``input_ids``, else ``inputs_embeds``, else
    the first tensor argument (None without one)."""
    for name in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def call_tokens(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Tokens of one call, from its token tensor (``input_ids``, else ``inputs_embeds``,
    else the first tensor argument): an integer tensor's elements, a floating one's rows
    (all dimensions but the last); None without a tensor argument."""
    t = _token_tensor(args, kwargs)
    if t is None:
        return None
    if not t.is_floating_point():
        return t.numel()
    return t.numel() // max(t.shape[-1], 1) if t.dim() >= 2 else 1


def small_pieces(batch: Any) -> list[Any]:
    """Decode-sized calls cut from one calibration batch: up to ``SMALL_PIECE_ROWS``
    rows, each its first ``SMALL_PIECE_TOKENS`` tokens (every tensor laid out as the
    token tensor, batch then sequence, is cut alike; tensors with only the batch
    dimension keep the row). Empty when the batch is already decode-sized or its
    layout is not (batch, sequence, ...)."""
    from .plan.frontier import SMALL_CALL_TOKENS

    args, kwargs = (batch.args, batch.kwargs) if isinstance(batch, Call) else \
        ((), batch) if isinstance(batch, dict) else \
        (tuple(batch), {}) if isinstance(batch, (tuple, list)) else ((batch,), {})
    tokens = call_tokens(args, kwargs)
    if tokens is None or tokens <= SMALL_CALL_TOKENS:
        return []
    ids = _token_tensor(args, kwargs)
    floating = ids.is_floating_point()
    if ids.dim() < (3 if floating else 2):
        return []
    rows, length = ids.shape[0], ids.shape[1]
    keep = min(length, SMALL_PIECE_TOKENS)

    def cut(value: Any, r: int) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
            return value
        if value.dim() >= 2 and value.shape[1] == length:
            return value[r:r + 1, :keep]
        return value[r:r + 1]

    out = []
    for r in range(min(rows, SMALL_PIECE_ROWS)):
        a = tuple(cut(v, r) for v in args)
        k = {name: cut(v, r) for name, v in kwargs.items()}
        out.append(Call(a, k) if isinstance(batch, Call) else k if isinstance(batch, dict)
                   else type(batch)(a) if isinstance(batch, (tuple, list)) else a[0])
    return out


def _mask(batch: Any) -> torch.Tensor | None:
    """The batch's attention mask (padding left out of the quality), if it has one."""
    kwargs = batch if isinstance(batch, dict) else batch.kwargs if isinstance(batch, Call) \
        else {}
    m = kwargs.get("attention_mask")
    return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None


def _detached(out: Any, whole: bool = False) -> Any:
    """A copy of the output the quality is measured on, as ``{kind: tensor}`` (``whole``:
    the whole output, for a quality callable)."""
    from .plan.quality import primary

    if whole:
        from torch.utils._pytree import tree_map

        return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                        out)
    got = primary(out)
    return None if got is None else {got[0]: got[1].detach().clone()}


def call_batch(fn: Any, batch: Any) -> Any:
    if isinstance(batch, Call):
        return fn(*batch.args, **batch.kwargs)
    if isinstance(batch, dict):
        return fn(**batch)
    if isinstance(batch, (tuple, list)):
        return fn(*batch)
    return fn(batch)


def _options(config: DynConfig) -> dict[str, Any]:
    return {"budget": config.budget, "methods": list(config.methods),
            "compiler": config.compiler, "form_options": dict(config.form_options),
            "budget_unit": config.budget_unit, "auto": config.auto}


def _is_dynamo_error(e: BaseException) -> bool:
    from torch._dynamo import exc as dexc

    return isinstance(e, (dexc.TorchDynamoException, dexc.Unsupported)) or any(
        "torch/_dynamo" in (f.filename or "") for f in _tb(e))


def _tb(e: BaseException) -> list:
    import traceback

    return traceback.extract_tb(e.__traceback__) if e.__traceback__ else []


# -- save / load: what calibration fitted, so an optimized model is rebuilt without data.
#
# ``opt.save(path)`` writes ``path/dyncompile.json`` (config and each form's metadata)
# and ``path/dyncompile.safetensors`` (each form's tensors: threshold tables, routers,
# permutations, curves). ``dyncompile.load(model, path)`` builds the same optimized
# model around the original model, restoring every form's runtime (and re-applying
# weight permutations) before the first call, so nothing is recalibrated.

FORMAT = 1
_JSON = "dyncompile.json"
_TENSORS = "dyncompile.safetensors"


def save(opt: DynModule, path: str | Path) -> Path:
    """Write the config and every calibrated form of ``opt`` under the folder ``path``."""
    from safetensors.torch import save_file

    pending = opt.state.pending_calibration()
    if pending or not opt.state.forms and opt.config.methods:
        raise RuntimeError("nothing to save yet: run calibration batches first "
                           f"(uncalibrated: {', '.join(pending) or ', '.join(opt.config.methods)})")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    forms: dict[str, Any] = {}
    for name, runtime in opt.state.forms.items():
        t, meta = runtime.export()
        forms[name] = meta
        for k, v in t.items():
            tensors[f"{name}:{k}"] = v.detach().cpu().clone().contiguous()
    cfg = opt.config
    doc = {"format": FORMAT, "config": {"budget": cfg.budget, "methods": list(cfg.methods),
                                        "compiler": cfg.compiler, "auto": cfg.auto,
                                        "budget_unit": cfg.budget_unit,
                                        "form_options": {k: dict(v) for k, v in
                                                         cfg.form_options.items()}},
           "forms": forms,
           "plan": opt.state.plan.to_dict() if opt.state.plan is not None else None,
           "tolerance": opt.state.tolerance,
           "params": {n: list(p.shape) for n, p in opt.model.named_parameters()}}
    (folder / _JSON).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    save_file(tensors, str(folder / _TENSORS))
    return folder


def own_model(model: nn.Module, methods: Iterable[str], inplace: bool) -> nn.Module:
    """``model`` itself when ``inplace`` or when no form in ``methods`` changes parameters,
    else a deep copy (same values, ties kept), so the caller's model stays as it was."""
    from .core.registry import forms

    registry = forms()
    if inplace or not any(registry[m].mutates_weights for m in methods):
        return model
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001  (say what to do instead)
        raise TypeError(
            f"dyncompile: {', '.join(m for m in methods if registry[m].mutates_weights)} "
            f"change the model's weights (memory order, permutations), so optimize() works "
            f"on a copy, but {type(model).__name__} could not be copied ({type(e).__name__}: "
            f"{e}); pass inplace=True to let the forms change this model") from e


def _check_params(folder: Path, saved: dict[str, list[int]] | None, model: nn.Module) -> None:
    """ValueError naming the first parameter the saved model had and ``model`` lacks (or
    has in another shape)."""
    if saved is None:  # saved before parameters were recorded
        return
    have = {n: list(p.shape) for n, p in model.named_parameters()}
    for name, shape in saved.items():
        if name not in have:
            raise ValueError(
                f"{folder} was saved from a model with parameter {name!r}, which "
                f"{type(model).__name__} does not have: load() needs the model the plan "
                f"was fitted on")
        if have[name] != shape:
            raise ValueError(
                f"{folder} was saved from a model whose parameter {name!r} has shape "
                f"{tuple(shape)}; in {type(model).__name__} it has {tuple(have[name])}")


def load(model: torch.nn.Module, path: str | Path, *, compiler: str | None = None,
         dynamic: bool | None = None, inplace: bool = False) -> DynModule:
    """Rebuild the optimized model saved at ``path`` around ``model`` (the original weights).

    As with ``optimize()``, ``model`` is left as it was unless ``inplace=True``.
    """
    from safetensors.torch import load_file

    from .core.registry import forms

    folder = Path(path)
    if not (folder / _JSON).is_file():
        raise FileNotFoundError(f"no saved dyncompile model at {folder} (missing {_JSON})")
    doc = json.loads((folder / _JSON).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{folder}: unsupported format {doc.get('format')!r}")
    cfg = dict(doc["config"])
    if compiler is not None:
        cfg["compiler"] = compiler
    config = DynConfig(**cfg)
    _check_params(folder, doc.get("params"), model)
    model = own_model(model, config.methods, inplace)
    opt = DynModule(model, config, dynamic=dynamic)
    tensors = load_file(str(folder / _TENSORS))
    for name, meta in doc["forms"].items():
        prefix = f"{name}:"
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        runtime = forms()[name].runtime()
        runtime.restore(mine, meta, model)
        opt.state.forms[name] = runtime
    if doc.get("plan"):
        opt.state.plan = Plan.from_dict(doc["plan"])
    opt.state.tolerance = doc.get("tolerance")
    return opt
