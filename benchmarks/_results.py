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
