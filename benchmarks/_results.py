"""What the benchmark scripts share: markdown tables and writing the results."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def minilm_batches(shapes: Iterable[tuple[int, int]], calibration: str = "sentences"
                   ) -> tuple[list[Any], dict[str, Any]]:
    """MiniLM calibration batches and timing batches of real sentences of exactly ``seq``
    tokens (from the harness's calibration split), keyed "BxS".

    ``calibration="sentences"``: the harness's 256 calibration sentences, 32 per batch,
    padded to the longest of each batch. ``"packed"``: serving-like rows like the timing
    ones (exactly 128 tokens, no padding), 4 batches of 8, cut from the train split's text
    (not the text the timing rows come from)."""
    import torch

    from dyncompile.eval.corpus import splits
    from dyncompile.eval.minilm import _exact_length_batch, load_tokenizer, tokenize

    torch.set_num_threads(2)
    torch._dynamo.config.recompile_limit = 64
    tok = load_tokenizer()
    parts = splits()
    texts = [x.text for x in parts.calibration]
    if calibration == "packed":
        train = [x.text for x in parts.train]
        rows = _exact_length_batch(tok, train, 32, 128)
        cal = [{k: v[i * 8:(i + 1) * 8] for k, v in rows.items()} for i in range(4)]
    elif calibration == "sentences":
        cal = [tokenize(tok, texts[i * 32:(i + 1) * 32]) for i in range(8)]
    else:
        raise ValueError(f"calibration must be 'sentences' or 'packed', not {calibration!r}")
    timing = {f"{b}x{n}": _exact_length_batch(tok, texts, b, n) for b, n in shapes}
    return cal, timing


def finish(res: dict[str, Any], path: str | Path, table: str, *notes: str) -> None:
    """Write ``res`` as JSON to ``path``, print the table, any notes and the device line."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table)
    for note in notes:
        print(note)
    m = res["meta"]
    print(f"\n{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, {m['date']}")
