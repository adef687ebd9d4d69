"""A long-range recall corpus for judging sparse prefill: text where part of every window can only
be predicted by retrieving a span seen 450-830 bytes earlier.

Each record is  S + F + S  with S 64 random printable ASCII bytes (unpredictable except by
copying: ln 94 = 4.5 nats a byte) and F 384-768 bytes of the embedded corpus (the Python
standard library's source). A model trained on these records learns to copy the second S from
the first (an induction head across the filler); at prefill, a sparse method that drops the
block holding the first S loses those bytes, and a local window of 128-256 tokens cannot reach
it at all. Deterministic (seeded), written as 40 files so the
trainer's by-file train/eval split holds out two of them.

    python bench/recall_corpus.py runs/recall_corpus
    python -m trainer.main --config=configs/lm.py:long --config.data.paths=runs/recall_corpus \\
        --workdir=runs/lm_recall
    python bench/sparse.py --part quality --workdir runs/lm_recall
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPAN, FILLER = 64, (384, 768)


def write(out_dir: str, *, files: int = 40, records_per_file: int = 60, seed: int = 0) -> None:
    from trainer.data import ByteCorpus

    text = ByteCorpus.from_config([]).train  # uint8, the stdlib's source
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    for f in range(files):
        parts = []
        for _ in range(records_per_file):
            span = rng.integers(33, 127, SPAN, dtype=np.uint8).tobytes()
            n = int(rng.integers(*FILLER))
            f0 = rng.integers(0, len(text) - n)
            parts += [span, text[f0:f0 + n].tobytes(), span]
        with open(os.path.join(out_dir, f"recall_{f:03d}.txt"), "wb") as fh:
            fh.write(b"".join(parts))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    write(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
