"""Early exit: MiniLM sentence embeddings and a small decoder's generate(), per budget.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/early_exit.py

1. Calibrates ``early_exit`` on 128 sentences that ship with Python
   (``pydoc_data.topics``), then embeds 64 other sentences, 16 per batch, at
   several budgets and prints the cosine to the dense embeddings, the mean
   depth the rows ran and the FLOPs the runtime reports. Rows that exit
   leave the batch, so later layers compute fewer rows.
2. Builds a 4-layer random Llama from its config, calibrates on random
   tokens, and decodes with ``opt.generate()``: at budget 1.0 the tokens
   equal the dense ``generate()``; below it, each decoding step lets rows
   exit and fills their KV entries for the skipped layers.

About a minute on 2 CPU cores (``compiler="eager"``, no Inductor).
"""

from __future__ import annotations

import torch
import transformers

import dyncompile
from dyncompile.eval.corpus import splits
from dyncompile.eval.minilm import embed, load_tokenizer, tokenize
from dyncompile.testing.zoo import load_minilm


def minilm() -> None:
    tok = load_tokenizer()
    s = splits()
    cal = [x.text for x in s.calibration[:128]]
    texts = [x.text for x in s.evaluation[:64]]
    model = load_minilm()
    dense = embed(model, tok, texts)
    batches = [tokenize(tok, cal[i:i + 16]) for i in range(0, len(cal), 16)]
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=batches,
                              compiler="eager")
    print("MiniLM embeddings (6 layers, 5 exits)")
    print("budget  cosine  depth  FLOPs spent")
    for b in (1.0, 0.8, 0.6, 0.4):
        depth, spent = [], []

        def call(*args, depth=depth, spent=spent, **kwargs):
            out = opt(*args, **kwargs)
            depth.append(opt.stats.ratio("exit_depth") or 1.0)
            spent.append(opt.stats.fraction)
            return out

        with dyncompile.budget(b):
            got = embed(call, tok, texts, batch_size=16)
        cos = torch.nn.functional.cosine_similarity(got, dense).mean()
        print(f"{b:6.2f}  {cos:6.3f}  {sum(depth) / len(depth):5.2f}  "
              f"{sum(spent) / len(spent):6.3f}")


def decoder() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=4, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    cal = [{"input_ids": torch.randint(1, 128, (4, 32))} for _ in range(4)]
    opt = dyncompile.optimize(model, methods=["early_exit"], calibration=cal,
                              compiler="eager")
    ids = torch.randint(1, 128, (3, 8))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
              min_new_tokens=16, pad_token_id=0)
    ref = model.generate(ids, **kw)
    print("\nLlama (4 layers, random weights), greedy generate() of 3 x 16 tokens")
    print("budget  same tokens as dense  depth  FLOPs spent")
    for b in (1.0, 0.6, 0.3):
        with dyncompile.budget(b):
            out = opt.generate(ids, **kw)
        same = float((out == ref)[:, ids.shape[1]:].float().mean())
        print(f"{b:6.2f}  {same:20.2f}  {opt.stats.ratio('exit_depth') or 1.0:5.2f}  "
              f"{opt.stats.fraction:6.3f}")


def main() -> None:
    torch.set_num_threads(2)
    with torch.no_grad():
        minilm()
        decoder()


if __name__ == "__main__":
    main()
