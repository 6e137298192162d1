"""Llama-shaped causal LMs built from configs (random weights): decode speed at real widths.

``build("1b")`` gives a ``LlamaForCausalLM`` of about 1 B parameters (GQA, SwiGLU,
head dim 128, untied embeddings) without downloading anything; speed does not
depend on the weights' values. ``"tiny"`` is the same code path at a size the
test suite can afford.
"""

from __future__ import annotations

import torch

# name -> LlamaConfig fields (vocab 32000, untied embeddings, head dim 128).
SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
               num_attention_heads=16, num_key_value_heads=4),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=4),
    # The suite's version: the same code path at a size a test can afford.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0,
          vocab: int = 32000) -> torch.nn.Module:
    """A random-init Llama of the named shape, in eval mode, weights in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                      **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range)
        model.model.rotary_emb.__init__(cfg)  # buffers that to_empty left unset
    return model.to(dtype).eval()


def save(shape: str, path: str, vocab: int = 32000, seed: int = 0,
         head_scale: float = 4.0) -> str:
    """Write a random-init Llama of the named shape to the folder ``path`` (config and
    safetensors, as a serving engine loads them) and return ``path``.

    ``head_scale`` widens the output head's weights so that greedy tokens are decided
    by clear logit gaps, not by rounding (engines that sum in a different order, or
    over shards, then pick the same tokens).
    """
    model = build(shape, torch.float32, seed=seed, vocab=vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    return path


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers ``module`` holds, each storage counted once."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def random_prompts(vocab: int, batches: int = 4, rows: int = 2, length: int = 32,
                   seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Batches of random token ids (calibration for a random-weight model)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
