"""No form, no cost: ``optimize(model, methods=[])`` against ``torch.compile(model)``.

Length-sorted batches of 32 unseen sentences (as sentence-transformers sends them:
every batch a new sequence length, so both models go dynamic after their second
shape), one pass over all batches per round, the two models interleaved, median of
paired ratios. Also one 1-row call, where the wrapper's per-call work shows most.
Models: the real MiniLM (6 layers, 384 wide) and a 12-layer, 768-wide BERT encoder
built from its config (random weights: only time is measured).

    python benchmarks/no_form_overhead.py [--repeats 9] [--batches 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from _results import finish, markdown_table

import dyncompile
from dyncompile.eval import corpus
from dyncompile.eval.minilm import load_tokenizer, tokenize
from dyncompile.eval.timing import device_info, interleaved_samples, paired_speedup
from dyncompile.testing import zoo


def _models() -> dict[str, torch.nn.Module]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072))
    return {"minilm (6 x 384)": zoo.load_minilm(), "bert encoder (12 x 768)": base}


def run(repeats: int, n_batches: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    torch._dynamo.config.recompile_limit = 64
    tok = load_tokenizer()
    texts = sorted((s.text for s in corpus.splits(0).evaluation), key=len)[:32 * n_batches]
    batches = [tokenize(tok, texts[i:i + 32]) for i in range(0, len(texts), 32)]
    one = tokenize(tok, texts[:1])
    rows = []
    for name, model in _models().items():
        model.eval()
        fns = {"torch.compile": torch.compile(model), "dyncompile": dyncompile.optimize(
            model, methods=[])}

        def sweep(fn: Any) -> Any:
            return lambda: [fn(**b) for b in batches]

        big = interleaved_samples({k: sweep(f) for k, f in fns.items()}, repeats, warmup=2)
        small = interleaved_samples({k: (lambda f=f: f(**one)) for k, f in fns.items()},
                                    repeats * 5, warmup=3)
        rows.append({
            "model": name, "batches": [list(b["input_ids"].shape) for b in batches],
            "compile_ms": 1e3 * statistics.median(big["torch.compile"]),
            "dyn_ms": 1e3 * statistics.median(big["dyncompile"]),
            "speed": paired_speedup(big, "torch.compile", "dyncompile"),
            "compile_1row_ms": 1e3 * statistics.median(small["torch.compile"]),
            "dyn_1row_ms": 1e3 * statistics.median(small["dyncompile"]),
            "speed_1row": paired_speedup(small, "torch.compile", "dyncompile")})
        torch._dynamo.reset()
    return {"meta": {**device_info(), "repeats": repeats}, "rows": rows}


def table(res: dict[str, Any]) -> str:
    body = [[r["model"], f"{r['compile_ms']:.0f}", f"{r['dyn_ms']:.0f}", f"{r['speed']:.3f}",
             f"{r['compile_1row_ms']:.2f}", f"{r['dyn_1row_ms']:.2f}", f"{r['speed_1row']:.3f}"]
            for r in res["rows"]]
    return markdown_table(["model", "torch.compile ms (all batches)", "dyncompile ms",
                           "speed vs torch.compile", "1 row: torch.compile ms",
                           "1 row: dyncompile ms", "1 row: speed"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batches", type=int, default=8, help="batches of 32 sentences")
    ap.add_argument("--json", default="benchmarks/results/no_form_overhead.json")
    args = ap.parse_args()
    res = run(args.repeats, args.batches)
    finish(res, args.json, table(res))


if __name__ == "__main__":
    main()
