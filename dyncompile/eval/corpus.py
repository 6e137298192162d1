"""Offline text: Python's own documentation topics (``pydoc_data.topics``).

It ships with every CPython, so every machine builds the same corpus. Text is
split into sentences; calibration and evaluation splits are disjoint and fixed
by a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Sentence:
    text: str
    doc: str  # the pydoc topic it came from


def documents() -> dict[str, str]:
    """Topic name -> text of Python's documentation topics."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def sentences(min_chars: int = 30, max_chars: int = 400) -> list[Sentence]:
    """All prose sentences of the corpus, in a fixed order (code lines dropped)."""
    out: list[Sentence] = []
    for name, text in documents().items():
        for para in re.split(r"\n\s*\n", text):
            lines = [ln for ln in para.splitlines() if not ln.startswith(("   ", "\t", ">>>"))]
            para = _SPACE.sub(" ", " ".join(lines)).strip()
            for s in _SENT.split(para):
                s = s.strip()
                letters = sum(c.isalpha() for c in s)
                if min_chars <= len(s) <= max_chars and letters > 0.6 * len(s):
                    out.append(Sentence(s, name))
    return out


@dataclass(frozen=True)
class Splits:
    calibration: list[Sentence]
    evaluation: list[Sentence]
    train: list[Sentence]


def splits(seed: int = 0, n_calibration: int = 256, n_evaluation: int = 512) -> Splits:
    """Disjoint calibration / evaluation / train splits of the sentences, fixed by ``seed``."""
    items = sentences()
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    if n_calibration + n_evaluation >= len(items):
        raise ValueError(f"corpus has {len(items)} sentences; asked for "
                         f"{n_calibration} + {n_evaluation}")
    cal = [items[i] for i in order[:n_calibration]]
    ev = [items[i] for i in order[n_calibration:n_calibration + n_evaluation]]
    train = [items[i] for i in order[n_calibration + n_evaluation:]]
    return Splits(cal, ev, train)
