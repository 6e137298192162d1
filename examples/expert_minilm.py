"""MiniLM's FFNs as dynamic-k mixtures of experts: quality and compute per budget, save, load.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/expert_minilm.py

Calibrates the ``expert`` form on 64 sentences that ship with Python
(``pydoc_data.topics``), then embeds 64 other sentences at several budgets and
prints the cosine to the dense embeddings and the FFN compute the runtime
reports. Finally saves what calibration fitted and rebuilds the optimized
model from a fresh MiniLM with ``dyncompile.load``: same outputs, no data.
Takes about a minute on 2 CPU cores (``compiler="eager"``, no Inductor).
"""

from __future__ import annotations

import tempfile

import torch

import dyncompile
from dyncompile.eval.corpus import splits
from dyncompile.eval.minilm import embed, load_tokenizer, tokenize
from dyncompile.testing.zoo import load_minilm


def main() -> None:
    torch.set_num_threads(2)
    tok = load_tokenizer()
    s = splits()
    cal_texts = [x.text for x in s.calibration[:64]]
    eval_texts = [x.text for x in s.evaluation[:64]]
    model = load_minilm()
    dense = embed(model, tok, eval_texts)

    batches = [tokenize(tok, cal_texts[i:i + 16]) for i in range(0, 64, 16)]
    opt = dyncompile.optimize(model, methods=["expert"], calibration=batches,
                              compiler="eager")
    sites = opt.state.forms["expert"].sites
    print(f"{len(sites)} FFNs, {next(iter(sites.values())).experts} experts each")

    print("budget  cosine  FFN compute (router included)")
    for b in (1.0, 0.75, 0.5, 0.3):
        with dyncompile.budget(b):
            emb = embed(opt, tok, eval_texts)
        cos = float((emb * dense).sum(-1).mean())
        print(f"{b:6.2f}  {cos:.4f}  {opt.stats.ratio('expert_compute'):.3f}")

    with tempfile.TemporaryDirectory() as folder:
        opt.save(folder)
        again = dyncompile.load(load_minilm(), folder, compiler="eager")
        batch = tokenize(tok, eval_texts[:8])
        with torch.no_grad(), dyncompile.budget(0.5):
            a = opt(**batch).last_hidden_state
            c = again(**batch).last_hidden_state
        print(f"loaded model, budget 0.5: max |difference| = {float((a - c).abs().max()):.2e}")


if __name__ == "__main__":
    main()
