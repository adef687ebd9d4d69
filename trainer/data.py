"""Input pipelines: Grain datasets, per-process sharding, global arrays (text corpora: trainer/text.py).

A Task hands the Trainer an *example*-level `grain.MapDataset`; `process_batches` turns it into
the host-local batches of this process such that the global batch is the same whatever the
number of processes (global batch b is examples [b*G, (b+1)*G) of the task's dataset, and process
p reads rows [p*G/P, (p+1)*G/P) of it). `global_batch` assembles the device arrays.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from typing import Sequence

import grain
import jax
import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from trainer.config import ConfigError
from trainer.text import MANIFEST, SHARD_FORMAT, is_eval_file, stdlib_files, text_files, token_dtype
from trainer.tokenizer import load_tokenizer


# ----------------------------------------------------------------------------- sharding
class _ProcessBatches(grain.MapDataset):
    """Local batch b of process p = examples [S + b*G + p*L, S + b*G + (p+1)*L) of the parent,
    stacked (G = global batch, L = G / P, S = the first example). The L examples are read with
    one batched `_getitems` call, which grain's shuffle/repeat/source datasets pass down to a
    source that supports batched reads; per-example reads cost ~25 us each in grain's
    bookkeeping, a visible share of a small model's step."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int,
                 first_example: int = 0):
        super().__init__(parent)
        self._g, self._p, self._l = global_batch, index, global_batch // count
        self._s = first_example
        self._len = (len(parent) - first_example) // global_batch

    def __len__(self):
        return self._len

    def __getitem__(self, b):
        if isinstance(b, slice):
            return self.slice(b)
        start = self._s + b * self._g + self._p * self._l
        items = self._parent._getitems(range(start, start + self._l))  # noqa: SLF001
        return {k: np.stack([x[k] for x in items]) for k in items[0]}

    def __str__(self):
        return f"ProcessBatches(global_batch={self._g}, process={self._p})"


def process_batches(ds: grain.MapDataset, global_batch: int, *, process_index: int | None = None,
                    process_count: int | None = None, prefetch: int = 2,
                    first_example: int = 0, num_workers: int = 0) -> grain.IterDataset:
    """Host-local batches (dicts of arrays with leading dim global_batch / process_count), from
    example `first_example` of `ds` on (a resume whose global batch changed goes on there).
    num_workers > 0: the batches are read by that many Grain worker processes (mp_prefetch;
    the order is the same)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch % n:
        raise ConfigError(f"config.train.global_batch_size={global_batch} is not divisible by "
                          f"the {n} processes")
    local = _ProcessBatches(ds, global_batch, p, n, first_example)
    it = local.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if num_workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=prefetch))
    return it


def global_batch(local: dict[str, np.ndarray], shardings: dict, batch_axis: int = 0
                 ) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays with the given per-key shardings; the
    processes' rows are concatenated along `batch_axis`. One call for the whole dict: a single
    batched transfer."""
    gshapes = {k: x.shape[:batch_axis] + (x.shape[batch_axis] * jax.process_count(),)
               + x.shape[batch_axis + 1:] for k, x in local.items()}
    return jax.make_array_from_process_local_data(shardings, local, gshapes)


# ----------------------------------------------------------------------------- unreadable files
class BadExample(ConfigError):
    """An example whose file cannot be read or decoded; `path` names the file. A family's
    loader raises it (the message says what was wrong); the Trainer's SkipBad wrapper replaces
    the example (config.data.skip_bad) or stops the run with the message."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # pickled from a Grain worker process to the trainer
        return type(self), (self.path, self.args[0])


class SkipBad(grain.MapDataset):
    """`parent` with each example that raises BadExample replaced by the next readable one
    (index i + 1, i + 2, ... modulo a finite parent's length), so batch shapes, the global batch
    and every process's rows stay as they were; each unreadable file is named once in a warning
    and counted (`skipped`). skip=False re-raises the error."""

    MAX_CONSECUTIVE = 64

    def __init__(self, parent: grain.MapDataset, skip: bool):
        super().__init__(parent)
        self._skip = skip
        self.skipped: dict[str, str] = {}  # path -> the error's message (this process's reads)

    def __len__(self):
        return len(self._parent)

    def _get(self, i: int):
        try:
            n = len(self._parent)
        except TypeError:
            n = None
        last = None
        for k in range(self.MAX_CONSECUTIVE):
            j = i + k if n is None or n >= 2**62 else (i + k) % n
            try:
                return self._parent[j]
            except BadExample as e:
                if not self._skip:
                    raise
                last = e
                if e.path not in self.skipped:
                    self.skipped[e.path] = str(e)
                    warnings.warn(f"data.skip_bad: skipping an unreadable example ({e}); "
                                  f"{len(self.skipped)} unreadable file(s) so far", stacklevel=2)
        raise ConfigError(f"config.data: {self.MAX_CONSECUTIVE} consecutive examples from "
                          f"example {i} on cannot be read (the last: {last}); is the data there?")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        return self._get(int(i))

    def _getitems(self, indices):
        try:
            return self._parent._getitems(indices)  # noqa: SLF001 -- batched when all read
        except BadExample:
            return [self._get(int(i)) for i in indices]

    def __str__(self):
        return f"SkipBad(skip={self._skip})"


def check_files(paths: Sequence[str], opener, *, what: str, skip_bad: bool,
                threads: int = 8) -> list[int]:
    """The up-front pass over a dataset's files, before the first step: `opener(path)` (a fast
    header read) raising for a file that cannot be used. Returns the indices of the good files;
    the bad ones are all reported at once with a count: a ConfigError (skip_bad False) or one
    warning naming each (skip_bad True: the run goes on without them)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path):
        try:
            if os.path.isfile(path) and os.path.getsize(path) == 0:  # (a video's clip: a folder)
                return "an empty file"
            opener(path)
        except Exception as e:  # noqa: BLE001 -- any reason a file cannot be read is reported
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    with ThreadPoolExecutor(threads) as pool:
        why = list(pool.map(one, paths))
    bad = [(p, w) for p, w in zip(paths, why) if w is not None]
    if bad:
        listed = "\n  ".join(f"{p}: {w}" for p, w in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        head = f"{len(bad)} of the {len(paths)} {what} cannot be read"
        if not skip_bad:
            raise ConfigError(f"config.data.paths: {head}:\n  {listed}{more}\nremove or replace "
                              "them, or set data.skip_bad=True to train without them")
        warnings.warn(f"data.skip_bad: {head}, left out:\n  {listed}{more}", stacklevel=2)
    return [i for i, w in enumerate(why) if w is None]


# ----------------------------------------------------------------------------- embedded data
def embedded_dir(kind: str, params: dict, override: str = "") -> str:
    """Where a family's embedded dataset is written once (override, else
    $XDG_CACHE_HOME or ~/.cache, /polyformer/<kind>_<hash of params>): the generators write
    real-format files there, read by the same loaders as real data."""
    if override:
        return override
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "polyformer", f"{kind}_{tag}")


# ----------------------------------------------------------------------------- prepared shards
class _ShardWriter:
    """Writes one split's token stream as ArrayRecord files of records of `chunk` ids (the last
    record of the split may be shorter), a new file every `per_file` records."""

    def __init__(self, out: str, split: str, dtype, chunk: int, per_file: int):
        self.out, self.split, self.dtype, self.chunk, self.per_file = out, split, dtype, chunk, per_file
        self.files, self.tokens, self.bytes, self.documents = [], 0, 0, 0
        self.buffer, self.writer, self.records = [], None, 0

    def _record(self, ids: np.ndarray) -> None:
        if self.writer is None or self.records == self.per_file:
            self._close_file()
            name = f"{self.split}-{len(self.files):05d}.array_record"
            self.writer = ArrayRecordWriter(os.path.join(self.out, name), "group_size:1")
            self.files.append(name)
            self.records = 0
        self.writer.write(ids.astype(self.dtype).tobytes())
        self.records += 1

    def _close_file(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def add(self, ids: list[int], nbytes: int) -> None:
        self.buffer.extend(ids)
        self.tokens += len(ids)
        self.bytes += nbytes
        self.documents += 1
        while len(self.buffer) >= self.chunk:
            self._record(np.asarray(self.buffer[:self.chunk]))
            del self.buffer[:self.chunk]

    def close(self) -> dict:
        if self.buffer:
            self._record(np.asarray(self.buffer))
            self.buffer = []
        self._close_file()
        return {"files": self.files, "tokens": self.tokens, "bytes": self.bytes,
                "documents": self.documents}


def prepare(paths: Sequence[str], tokenizer_spec: str, out: str, *, chunk_tokens: int = 4096,
            file_tokens: int = 1 << 24, progress: bool = True) -> dict:
    """Tokenizes the text files of `paths` (the embedded corpus when empty) once into
    ArrayRecord shards under `out` with a manifest.json: the train / eval split by file of the
    byte-level corpus (trainer.text.ByteCorpus), so the streams equal what a run tokenizes on
    the fly, read one batch of files at a time (memory: one batch, not the corpus). Written
    to a temporary directory renamed at the end: an interrupted prepare leaves no half shards.
    An existing non-empty `out` is refused (nothing is overwritten)."""
    tokenizer = load_tokenizer(tokenizer_spec)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"prepare: {out!r} exists and is not an empty directory; choose a new "
                          "output directory (nothing is overwritten)")
    if paths:
        files = text_files(paths)
    else:
        root, names = stdlib_files()
        files = [(os.path.join(root, n), n) for n in names]
    held_out = [is_eval_file(key) for _, key in files]
    by_file = any(held_out) and not all(held_out)  # else the last 10% of every file (ByteCorpus)
    tmp = f"{out.rstrip(os.sep)}.partial-{os.getpid()}"
    os.makedirs(tmp)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(tmp, s, dtype, chunk_tokens, max(1, file_tokens // chunk_tokens))
               for s in ("train", "eval")}
    total = sum(os.path.getsize(f) for f, _ in files)
    bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                    desc=f"tokenizing {len(files)} files")
    start = time.perf_counter()

    def flush(docs):
        texts = [d.decode("utf-8", errors="replace") for _, d in docs]
        for (split, d), ids in zip(docs, tokenizer.encode_batch(texts)):
            writers[split].add(tokenizer.document(ids), len(d))

    batch, batch_bytes = [], 0
    for (path, _), held in zip(files, held_out):
        with open(path, "rb") as f:
            data = f.read()
        if by_file:
            parts = [("eval" if held else "train", data)]
        else:
            cut = int(len(data) * 0.9)
            parts = [("train", data[:cut]), ("eval", data[cut:])]
        batch += parts
        batch_bytes += len(data)
        bar.update(len(data))
        if batch_bytes >= 8 << 20:
            flush(batch)
            batch, batch_bytes = [], 0
    flush(batch)
    bar.close()
    # each split in file order, as the byte corpus orders it: the streams agree
    splits = {s: w.close() for s, w in writers.items()}
    if tokenizer.files:
        os.makedirs(os.path.join(tmp, "tokenizer"))
        for f in tokenizer.files:
            shutil.copy2(f, os.path.join(tmp, "tokenizer", os.path.basename(f)))
    manifest = {"format": SHARD_FORMAT, "tokenizer": tokenizer.spec,
                "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "dtype": np.dtype(dtype).name, "chunk_tokens": chunk_tokens,
                "sources": list(paths) or ["(the embedded corpus)"], "splits": splits,
                "seconds": round(time.perf_counter() - start, 2)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.rename(tmp, out)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.data",
                                description="Data tools: pre-tokenized shards for the language "
                                "families.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("prepare", help="tokenize text files once into ArrayRecord shards",
                       description="Tokenizes text files into ArrayRecord shards + manifest.json; "
                       "train from them with --config.data.paths=OUT (and the same "
                       "--config.data.tokenizer).")
    s.add_argument("--data.paths", dest="paths", default="",
                   help="text files or directories, comma-separated (default: the embedded "
                        "corpus)")
    s.add_argument("--data.tokenizer", dest="tokenizer", default="bytes",
                   help="bytes | a tokenizer.json | a SentencePiece .model (or their directory)")
    s.add_argument("--chunk_tokens", type=int, default=4096, help="ids per record")
    s.add_argument("--file_tokens", type=int, default=1 << 24, help="ids per shard file")
    s.add_argument("out", help="output directory (new or empty)")
    args = p.parse_args(argv)
    if args.chunk_tokens < 1 or args.file_tokens < 1:
        p.error("--chunk_tokens and --file_tokens must be >= 1")
    try:
        m = prepare([x for x in args.paths.split(",") if x], args.tokenizer, args.out,
                    chunk_tokens=args.chunk_tokens, file_tokens=args.file_tokens,
                    progress=sys.stderr.isatty())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sp = m["splits"]
    print(f"wrote {args.out}: {sp['train']['tokens']:,} train + {sp['eval']['tokens']:,} eval "
          f"tokens ({m['vocab_size']}-token {m['tokenizer']!r}) in "
          f"{len(sp['train']['files']) + len(sp['eval']['files'])} files, {m['seconds']} s; "
          f"train with --config.data.paths={args.out}"
          + (f" --config.data.tokenizer={os.path.join(args.out, 'tokenizer')}"
             if m["tokenizer"] != "bytes" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
