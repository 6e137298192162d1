"""vLLM dense against vLLM with dyncompile, in one run: decode tokens/s, spent compute,
and whether greedy tokens at budget 1.0 equal vLLM's own (``make serve-demo``).

Run in vLLM's environment: ``python -m dyncompile.integrations.vllm.demo --shape 0.5b``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

from . import calibrate, config, set_budget, stats


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]}
            for _ in range(n)]


def _bind_workers(tp: int) -> None:
    """One share of this machine's cores per tensor-parallel worker (vLLM on CPU wants a
    binding for TP > 1), unless ``VLLM_CPU_OMP_THREADS_BIND`` is already set."""
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < tp:
            raise SystemExit(f"--tp {tp} needs at least {tp} cores; this machine has "
                             f"{len(cores)}")
        share = len(cores) // tp
        parts = [cores[i * share:(i + 1) * share] for i in range(tp)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(str(c) for c in part) for part in parts)
        print(f"VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}",
              flush=True)


def _engine(path: str, tp: int, compilation_config: dict[str, Any] | None, max_len: int,
            max_seqs: int) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=path, skip_tokenizer_init=True, dtype="float32",
                                  max_model_len=max_len, tensor_parallel_size=tp,
                                  max_num_seqs=max_seqs, seed=0)
    if compilation_config is not None:
        kwargs["compilation_config"] = compilation_config
    return LLM(**kwargs)


def _generate(llm: Any, prompts: list, tokens: int) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                        detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, [list(o.outputs[0].token_ids) for o in out]


def _close(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def run(shape: str = "tiny", tp: int = 1, batches: tuple[int, ...] = (1, 8),
        budgets: tuple[float, ...] = (1.0, 0.5, 0.3), tokens: int = 32,
        prompt_len: int = 16, repeats: int = 3, folder: str = ".cache/serve",
        vocab: int = 32000, calibration_prompts: int = 16) -> dict[str, Any]:
    """Measure vLLM dense and vLLM + dyncompile (gated) at each budget, interleaved."""
    from ...testing.llama_shapes import save

    path = os.path.join(folder, f"llama-{shape}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"writing a random-init {shape} Llama to {path}", flush=True)
        save(shape, path, vocab=vocab)
    max_seqs = max(batches)
    max_len = prompt_len + tokens + 64
    _bind_workers(tp)
    print(f"starting vLLM dense (tp={tp})", flush=True)
    dense = _engine(path, tp, None, max_len, max_seqs)
    print(f"starting vLLM + dyncompile (tp={tp})", flush=True)
    dyn = _engine(path, tp, config(budget=1.0, methods=["gated"]), max_len, max_seqs)
    calibrate(dyn, _prompts(calibration_prompts, 64, vocab, seed=1), max_tokens=16)

    results: dict[str, Any] = {"shape": shape, "tp": tp, "tokens": tokens,
                               "prompt_len": prompt_len, "rows": []}
    for batch in batches:
        prompts = _prompts(batch, prompt_len, vocab, seed=2)
        # Warm-up and the budget-1.0 identity check.
        _, ref = _generate(dense, prompts, tokens)
        set_budget(dyn, 1.0)
        _, same = _generate(dyn, prompts, tokens)
        identical = ref == same
        times: dict[str, list[float]] = {"dense": []}
        spent: dict[float, float] = {}
        for b in budgets:
            times[f"dyn@{b:g}"] = []
        for _ in range(repeats):
            times["dense"].append(_generate(dense, prompts, tokens)[0])
            for b in budgets:
                set_budget(dyn, b)
                stats(dyn, reset=True)
                times[f"dyn@{b:g}"].append(_generate(dyn, prompts, tokens)[0])
                per_worker = stats(dyn)
                spent[b] = statistics.mean(w["spent"] for w in per_worker)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch": batch, "identical_at_1": identical,
               "tok_s": {k: batch * tokens / v for k, v in med.items()},
               "spent": {f"dyn@{b:g}": spent[b] for b in budgets}}
        row["ratio"] = {k: row["tok_s"][k] / row["tok_s"]["dense"] for k in row["tok_s"]}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    _close(dyn)
    _close(dense)
    return results


def table(runs: list[dict[str, Any]]) -> str:
    """The results as a markdown table: tokens/s, ratio to vLLM dense, spent fraction."""
    budgets = [k for k in runs[0]["rows"][0]["tok_s"] if k != "dense"]
    head = ["TP", "batch", "vLLM dense tok/s"] + [f"{k} tok/s (ratio, spent)" for k in budgets]
    head.append("budget 1.0 = dense tokens")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        for row in r["rows"]:
            cells = [str(r["tp"]), str(row["batch"]), f"{row['tok_s']['dense']:.2f}"]
            cells += [f"{row['tok_s'][k]:.2f} ({row['ratio'][k]:.2f}x, {row['spent'][k]:.2f})"
                      for k in budgets]
            cells.append("yes" if row["identical_at_1"] else "no")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="tiny", help="tiny, 0.5b or 1b (random-init Llama)")
    p.add_argument("--tp", default="1", help="tensor-parallel sizes, comma-separated")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--budgets", default="1.0,0.5,0.3")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--from-json", default=None, help="print the table of a saved run")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        print(table(saved["runs"]))
        return 0
    budgets = tuple(float(b) for b in a.budgets.split(","))
    batches = tuple(int(b) for b in a.batches.split(","))
    all_runs = []
    for tp in (int(t) for t in a.tp.split(",")):
        all_runs.append(run(a.shape, tp, batches, budgets, a.tokens, repeats=a.repeats))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
            platform.machine(), "python": sys.version.split()[0]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "runs": all_runs}, f, indent=1)
    print(table(all_runs))
    first = all_runs[0]["rows"][0]
    half = next((b for b in budgets if b == 0.5), budgets[-1])
    key = f"dyn@{half:g}"
    same = all(r["identical_at_1"] for run_ in all_runs for r in run_["rows"])
    print(f"vllm: dense {first['tok_s']['dense']:.1f} tok/s, {key} "
          f"{first['tok_s'][key]:.1f} tok/s, ratio {first['ratio'][key]:.2f}; "
          f"budget 1.0 identical: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
