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


def minilm_batches(shapes: Iterable[tuple[int, int]]) -> tuple[list[Any], dict[str, Any]]:
    """MiniLM calibration batches (the harness's 256 calibration sentences, 32 per batch)
    and timing batches of real sentences of exactly ``seq`` tokens, keyed "BxS"."""
    import torch

    from dyncompile.eval.corpus import splits
    from dyncompile.eval.minilm import _exact_length_batch, load_tokenizer, tokenize

    torch.set_num_threads(2)
    torch._dynamo.config.recompile_limit = 64
    tok = load_tokenizer()
    texts = [x.text for x in splits().calibration]
    cal = [tokenize(tok, texts[i * 32:(i + 1) * 32]) for i in range(8)]
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
