"""Pre-tokenized shards against raw text (issue 26 item 5): the time to prepare ~100 MB of text
(`python -m trainer.data prepare`, byte-level BPE and bytes), and the default LM's input
pipeline (configs/lm.py:default: 16 x 256 tokens per batch, the Trainer's per-process batches)
from the shards and from the raw text (read and tokenized when the run starts), side by side.

The text: copies of the embedded corpus (the Python standard library's sources) until --mb
megabytes. The BPE: 1,024 tokens trained on the embedded corpus's train split.

    python bench/tokens.py [--mb 100] [--batches 400] [--vocab 1024]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_text(root: str, mb: int) -> int:
    """Copies of the embedded corpus's files under root until `mb` MB; returns the bytes."""
    from trainer.text import stdlib_files

    src, names = stdlib_files()
    total, copy = 0, 0
    while total < mb * 1e6:
        for n in names:
            dst = os.path.join(root, f"copy{copy}", n)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(src, n), dst)
            total += os.path.getsize(dst)
            if total >= mb * 1e6:
                break
        copy += 1
    return total


def pipeline(config, batches: int) -> dict:
    """Seconds until the first batch (building the task's data: reading / tokenizing, or opening
    the shards) and tokens/s over `batches` batches after it, through process_batches."""
    from trainer.data import process_batches
    from trainer.task import get_task

    t0 = time.perf_counter()
    task = get_task(config.task)(config)
    data = iter(process_batches(task.train_data(), config.train.global_batch_size,
                                process_index=0, process_count=1))
    first = next(data)
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(data)
    secs = time.perf_counter() - t1
    tokens = batches * b["tokens"].shape[0] * (b["tokens"].shape[1] - 1)
    assert first["tokens"].shape == b["tokens"].shape
    return {"start": start, "tokens_s": tokens / secs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--vocab", type=int, default=1024)
    a = p.parse_args()
    from trainer.cli import load_config
    from trainer.data import prepare
    from trainer.perf import _cpu_name
    from trainer.tokenizer import documents, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text")
        nbytes = write_text(text, a.mb)
        t0 = time.perf_counter()
        bpe = train_bpe(documents(()), a.vocab, os.path.join(tmp, "bpe"), progress=False)
        bpe_s = time.perf_counter() - t0
        rows = []
        for name, spec in (("bytes", "bytes"), (f"BPE {a.vocab}", os.path.dirname(bpe.spec))):
            out = os.path.join(tmp, f"shards_{name.split()[0]}")
            t0 = time.perf_counter()
            m = prepare([text], spec, out, progress=False)
            prep = time.perf_counter() - t0
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["eval"]["tokens"]
            size = sum(os.path.getsize(os.path.join(out, f)) for s in m["splits"].values()
                       for f in s["files"])
            fields = [f"data.tokenizer={spec}", f"model.vocab_size={max(256, bpe.vocab_size)}"]
            raw = pipeline(load_config("configs/lm.py:default", fields + [f"data.paths={text}"]),
                           a.batches)
            shards = pipeline(load_config("configs/lm.py:default", fields + [f"data.paths={out}"]),
                              a.batches)
            rows.append((name, prep, tokens, size, raw, shards))
    print(f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{nbytes / 1e6:.0f} MB of text ({a.mb} MB asked: copies of the embedded corpus); "
          f"the BPE ({a.vocab} tokens) trained in {bpe_s:.1f} s on the embedded train split; "
          f"pipeline: configs/lm.py:default batches (16 x 256 tokens), {a.batches} batches "
          "after the first\n")
    print("| tokenizer | prepare s | prepare MB/s | tokens | shards MB | raw text: s to first "
          "batch | raw text: tokens/s | shards: s to first batch | shards: tokens/s | shards / "
          "raw tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, prep, tokens, size, raw, sh in rows:
        print(f"| {name} | {prep:.1f} | {nbytes / 1e6 / prep:.1f} | {tokens:,} | "
              f"{size / 1e6:.0f} | {raw['start']:.1f} | {raw['tokens_s']:,.0f} | "
              f"{sh['start']:.2f} | {sh['tokens_s']:,.0f} | {sh['tokens_s'] / raw['tokens_s']:.2f}x |")


if __name__ == "__main__":
    main()
