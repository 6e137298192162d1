"""Save and load what calibration fitted, so an optimized model is rebuilt without data.

``opt.save(path)`` writes ``path/dyncompile.json`` (config and each form's
metadata) and ``path/dyncompile.safetensors`` (each form's tensors: threshold
tables, routers, permutations, curves). ``dyncompile.load(model, path)``
builds the same optimized model around a fresh copy of the original model,
restoring every form's runtime (and re-applying weight permutations) before
the first call, so nothing is recalibrated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .module import DynModule

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
                                        "compiler": cfg.compiler,
                                        "form_options": {k: dict(v) for k, v in
                                                         cfg.form_options.items()}},
           "forms": forms}
    (folder / _JSON).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    save_file(tensors, str(folder / _TENSORS))
    return folder


def load(model: torch.nn.Module, path: str | Path, *, compiler: str | None = None,
         dynamic: bool | None = None) -> DynModule:
    """Rebuild the optimized model saved at ``path`` around ``model`` (the original weights)."""
    from safetensors.torch import load_file

    from ..config import DynConfig
    from ..passes.rewrite import FORMS
    from .module import DynModule

    folder = Path(path)
    if not (folder / _JSON).is_file():
        raise FileNotFoundError(f"no saved dyncompile model at {folder} (missing {_JSON})")
    doc = json.loads((folder / _JSON).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{folder}: unsupported format {doc.get('format')!r}")
    cfg = dict(doc["config"])
    if compiler is not None:
        cfg["compiler"] = compiler
    opt = DynModule(model, DynConfig(**cfg), dynamic=dynamic)
    tensors = load_file(str(folder / _TENSORS))
    for name, meta in doc["forms"].items():
        prefix = f"{name}:"
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        runtime = FORMS[name].runtime()
        runtime.restore(mine, meta, model)
        opt.state.forms[name] = runtime
    return opt
