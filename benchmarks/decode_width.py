"""Decode speed at real model widths: Llama-shaped LMs built from configs, dense vs forms.

Each shape is a ``LlamaForCausalLM`` (GQA, SwiGLU) built from a config with random
weights (speed does not depend on the values; quality is measured on the trained
harness LM by ``dyncompile bench``). The dense model runs its ``forward`` under the
default ``torch.compile``; each form is ``dyncompile.optimize(model, methods=[form],
calibration=..., plan=False)`` (calibrated on random token batches; the budget is
the form's own knob: ``gated`` keeps that share of its linears' work) at every budget;
``planned`` (or ``planned:gated+expert``) is ``optimize(model, methods=[...],
calibration=...)`` with its plan, the budget a fraction of the whole model (decode
steps run the plan's decode-sized frontier). All go
through Hugging Face ``generate()`` (greedy, KV cache) at batch 1 (or ``--batch``),
interleaved, median of repeats, a fixed number of threads. Reported: tokens/s, the
ratio to dense, the fraction of the model's dense FLOPs spent (the whole ``generate()``,
and its decode steps alone), the bytes each model
keeps resident (parameters and buffers, shared storage counted once), the peak memory
of a ``generate()`` call (resident bytes plus how far the process's resident set rose
above its size before the call, Linux) and whether greedy tokens at budget 1.0 equal
dense.

    python benchmarks/decode_width.py [--shape 0.5b|1b|tiny] [--dtype fp32|bf16]
        [--methods gated,expert] [--budgets 1.0,0.75,0.5,0.3] [--new-tokens 16]
        [--repeats 3] [--batch 1] [--threads 2] [--json PATH]
    python benchmarks/decode_width.py --markdown BENCHMARKS.md   # the table, from results/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import dyncompile
from dyncompile.eval.sweep import parse_method
from dyncompile.eval.timing import device_info, peak_rss_during, time_interleaved
from dyncompile.testing.llama_shapes import DTYPES, SHAPES, build, random_prompts, resident_bytes


def run(shape: str = "0.5b", dtype: str = "fp32", methods: tuple[str, ...] = ("gated",),
        budgets: tuple[float, ...] = (1.0, 0.75, 0.5, 0.3), new_tokens: int = 16,
        repeats: int = 3, batch: int = 1, prompt_len: int = 32,
        threads: int = 2) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    t0 = time.perf_counter()
    base = build(shape, DTYPES[dtype])
    vocab = base.config.vocab_size
    dense_bytes = resident_bytes(base)
    dense_fwd = torch.compile(base.forward)
    models: dict[str, Any] = {}
    resident = {"dense": dense_bytes}
    setup_s: dict[str, float] = {}
    for method in methods:
        t1 = time.perf_counter()
        if method.startswith("planned"):  # the whole model's budget, through the plan
            forms = method.split(":", 1)[1].split("+") if ":" in method else ["gated"]
            opt = dyncompile.optimize(base, methods=forms, calibration=random_prompts(vocab))
        else:
            form, opts = parse_method(method)
            opt = dyncompile.optimize(base, methods=[form], calibration=random_prompts(vocab),
                                      form_options={form: opts} if opts else None,
                                      plan=False)
        setup_s[method] = time.perf_counter() - t1
        models[method] = opt
        resident[method] = resident_bytes(opt.model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    def gen_dense() -> torch.Tensor:
        fwd = base.forward
        base.forward = dense_fwd
        try:
            return base.generate(ids, **kw)
        finally:
            base.forward = fwd

    spent: dict[str, float] = {}

    def gen_opt(method: str, b: float) -> torch.Tensor:
        with dyncompile.budget(b):
            out = models[method].generate(ids, **kw)
        if kw["max_new_tokens"] == new_tokens:  # not a prefill-only call
            spent[f"{method}@{b}"] = models[method].stats.fraction
        return out

    one = {**kw, "max_new_tokens": 1, "min_new_tokens": 1}

    def prefill(fn: Any, **kwargs: Any) -> Any:
        """``fn`` generating one token only: the prompt's share of a generate() call."""
        saved = dict(kw)
        kw.update(one)
        try:
            return fn(**kwargs)
        finally:
            kw.clear()
            kw.update(saved)

    fns = {"dense": gen_dense, "dense/prefill": lambda: prefill(gen_dense)}
    same: dict[str, bool] = {}
    with torch.no_grad():
        ref = gen_dense()
        for method in methods:
            same[method] = torch.equal(ref, gen_opt(method, 1.0))
            for b in budgets:
                fns[f"{method}@{b}"] = lambda m=method, b=b: gen_opt(m, b)
                fns[f"{method}@{b}/prefill"] = lambda m=method, b=b: prefill(gen_opt, method=m,
                                                                             b=b)
        compiles = dyncompile.compile_count()
        t = time_interleaved(fns, repeats=repeats, warmup=1)
        # The decode steps alone: the whole generate() less a prefill-only one (the prompt
        # runs dense where it is longer than the sparse kernels' token limit).
        decode: dict[str, float] = {}
        for method in methods:
            opt = models[method]
            for b in budgets:
                with dyncompile.budget(b):
                    opt.generate(ids, **kw)
                    full = opt.stats
                    opt.generate(ids, **one)
                    pre = opt.stats
                dense_steps = full.dense_flops - pre.dense_flops
                decode[f"{method}@{b}"] = (full.spent_flops - pre.spent_flops) / dense_steps
        # Peak memory of one generate() call: the model's bytes plus the working set.
        rise = {"dense": peak_rss_during(gen_dense)}
        for method in methods:
            for b in budgets:
                rise[f"{method}@{b}"] = peak_rss_during(lambda m=method, b=b: gen_opt(m, b))
        peak = {k: None if v is None or rise["dense"] is None else
                (resident[k.split("@")[0]] + v) / (dense_bytes + rise["dense"])
                for k, v in rise.items()}
    names = [k for k in t if not k.endswith("/prefill")]
    tokens_s = {k: batch * new_tokens / t[k] for k in names}
    # Decode steps alone: the new tokens after the first over the time past the prefill.
    decode_s = {k: batch * (new_tokens - 1) / max(t[k] - t[f"{k}/prefill"], 1e-9)
                for k in names}
    n_params = sum(p.numel() for p in base.parameters())
    return {"meta": {**device_info(), "shape": shape, "params": n_params, "dtype": dtype,
                     "config": SHAPES[shape], "batch": batch, "new_tokens": new_tokens,
                     "prompt_len": prompt_len, "repeats": repeats, "threads": threads,
                     "methods": list(methods), "budgets": list(budgets),
                     "setup_s": setup_s, "wall_s": time.perf_counter() - t0},
            "greedy_equal_at_budget_1": same,
            "recompiles_while_timing": dyncompile.compile_count() - compiles,
            "tokens_per_s": tokens_s,
            "speedup": {k: v / tokens_s["dense"] for k, v in tokens_s.items()},
            "decode_tokens_per_s": decode_s,
            "decode_speedup": {k: v / decode_s["dense"] for k, v in decode_s.items()},
            "prefill_s": {k: t[f"{k}/prefill"] for k in names},
            "spent_fraction": spent,
            "spent_fraction_decode_steps": decode,
            "resident_vs_dense": {k: v / dense_bytes for k, v in resident.items()},
            "generate_peak_rise_bytes": rise,
            "peak_vs_dense": peak}


SECTION = "decode-width"
COMMAND = "python benchmarks/decode_width.py --markdown BENCHMARKS.md"


def render(results: list[dict[str, Any]]) -> str:
    """One table row per (shape, dtype, batch, model), from saved result files."""
    lines = ["| shape | dtype | batch | model | decode tok/s | decode vs dense | "
             "generate() vs dense | spent (decode steps) | resident vs dense | "
             "peak vs dense | greedy = dense at 1.0 | CPU, ISA, threads, date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["meta"]["params"], r["meta"]["dtype"],
                                            r["meta"]["batch"])):
        m = r["meta"]
        where = f"{m['cpu_model']}, {m.get('isa', '?')}, {m['threads']}, {m['date'][:10]}"
        for k, v in r["decode_tokens_per_s"].items():
            method = k.split("@")[0]
            same = "" if k == "dense" else ("yes" if r["greedy_equal_at_budget_1"][method]
                                            else "**no**")
            spent = r["spent_fraction_decode_steps"].get(k, 1.0)
            res = r["resident_vs_dense"].get(method, 1.0)
            pk = r.get("peak_vs_dense", {}).get(k)
            pk_s = "" if pk is None else f"{pk:.3f}"
            lines.append(f"| {m['shape']} ({m['params'] / 1e9:.2f} B) | {m['dtype']} | "
                         f"{m['batch']} | {k} | {v:.2f} | {r['decode_speedup'][k]:.2f}x | "
                         f"{r['speedup'][k]:.2f}x | {spent:.3f} | {res:.3f} | {pk_s} | "
                         f"{same} | {where} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--methods", default="gated,expert")
    ap.add_argument("--budgets", default="1.0,0.75,0.5,0.3")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None,
                    help="default: benchmarks/results/decode_width_<shape>_<dtype>_b<batch>.json")
    ap.add_argument("--markdown", default=None,
                    help="only rewrite this page's table from the saved results")
    a = ap.parse_args()
    if a.markdown:
        from dyncompile.eval.report import update_markdown

        files = sorted(Path("benchmarks/results").glob("decode_width_*.json"))
        update_markdown(Path(a.markdown), render([json.loads(f.read_text()) for f in files]),
                        section=SECTION, command=COMMAND,
                        title="Decode at real widths (Llama shapes, CPU)")
        return
    res = run(a.shape, a.dtype, tuple(a.methods.split(",")),
              tuple(float(b) for b in a.budgets.split(",")), a.new_tokens, a.repeats,
              a.batch, a.prompt_len, a.threads)
    path = Path(a.json or f"benchmarks/results/decode_width_{a.shape}_{a.dtype}_b{a.batch}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))


if __name__ == "__main__":
    main()
