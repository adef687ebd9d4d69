"""Input pipelines: Grain datasets, per-process sharding, global arrays; byte-level text corpora.

A Task hands the Trainer an *example*-level `grain.MapDataset`; `process_batches` turns it into
the host-local batches of this process such that the global batch is the same whatever the
number of processes (global batch b is examples [b*G, (b+1)*G) of the task's dataset, and process
p reads rows [p*G/P, (p+1)*G/P) of it). `global_batch` assembles the device arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from typing import Sequence

import grain
import jax
import numpy as np

from trainer.config import ConfigError


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
            if os.path.getsize(path) == 0:
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


# ----------------------------------------------------------------------------- text corpora
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> tuple[str, list[str]]:
    """The Python standard library's own .py sources (tests excluded), sorted: on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        files += [os.path.relpath(os.path.join(d, f), root) for f in sorted(names) if f.endswith(".py")]
    return root, sorted(files)


def text_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Files named in data.paths as (path, name) pairs, directories walked recursively (sorted,
    hidden files skipped). The name is the path relative to its data.paths entry (a file's
    basename for a file entry): the train/eval split hashes it, so the split does not depend on
    where the corpus lives."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for d, dirs, names in os.walk(p):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                for f in sorted(names):
                    if not f.startswith("."):
                        full = os.path.join(d, f)
                        out.append((full, os.path.relpath(full, p)))
        elif os.path.isfile(p):
            out.append((p, os.path.basename(p)))
        else:
            raise ConfigError(f"config.data.paths: {p!r} does not exist")
    if not out:
        raise ConfigError(f"config.data.paths: no files under {list(paths)}")
    return out


def is_eval_file(name: str, eval_every: int = 20) -> bool:
    """Deterministic train/eval split by file: about 1 in `eval_every` files is held out."""
    return zlib.crc32(name.encode()) % eval_every == 0


@dataclass(frozen=True)
class ByteCorpus:
    """Byte-level train/eval corpora (uint8 arrays) split by file."""
    train: np.ndarray
    eval: np.ndarray
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]

    @classmethod
    def from_files(cls, root: str, names: Sequence[str],
                   split_keys: Sequence[str] | None = None) -> "ByteCorpus":
        """Files root/name; a file is held out for eval by is_eval_file(its split key), which
        defaults to its name."""
        parts = {True: [], False: []}
        for n, key in zip(names, split_keys or names):
            with open(os.path.join(root, n), "rb") as f:
                parts[is_eval_file(key)].append((n, f.read()))
        if not parts[True] or not parts[False]:
            # too few files to split by file: hold out the last 10% of each file's bytes instead
            everything = parts[True] + parts[False]
            cut = [(n, int(len(b) * 0.9)) for n, b in everything]
            parts = {False: [(n, b[:c]) for (n, b), (_, c) in zip(everything, cut)],
                     True: [(n, b[c:]) for (n, b), (_, c) in zip(everything, cut)]}
        join = lambda ps: np.frombuffer(b"".join(b for _, b in ps), dtype=np.uint8)
        return cls(train=join(parts[False]), eval=join(parts[True]),
                   train_files=tuple(n for n, _ in parts[False]),
                   eval_files=tuple(n for n, _ in parts[True]))

    @classmethod
    def from_config(cls, paths: Sequence[str]) -> "ByteCorpus":
        """The embedded stdlib corpus when paths is empty, else the given text files/directories."""
        if not paths:
            return _stdlib_corpus()
        files = text_files(paths)
        empty = [f for f, _ in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise ConfigError(f"config.data.paths={tuple(paths)}: every file is empty ("
                              f"{', '.join(map(repr, empty[:5]))}{' ...' if len(empty) > 5 else ''}"
                              "); point it at text files with content")
        return cls.from_files("", [f for f, _ in files], [k for _, k in files])

    def describe(self, split: str) -> str:
        """'the train split of files a, b, ...' for messages."""
        names = self.train_files if split == "train" else self.eval_files
        return (f"the {split} split of {', '.join(map(repr, names[:5]))}"
                f"{' ...' if len(names) > 5 else ''}")


_CACHE: dict = {}


def _stdlib_corpus() -> ByteCorpus:
    if "stdlib" not in _CACHE:
        _CACHE["stdlib"] = ByteCorpus.from_files(*stdlib_files())
    return _CACHE["stdlib"]


class ByteWindows:
    """Non-overlapping windows of seq_len + 1 bytes: example i = data[i*T : i*T + T + 1]."""

    def __init__(self, data: np.ndarray, seq_len: int, what: str = "the corpus"):
        self.data, self.seq_len = data, seq_len
        self.n = (len(data) - 1) // seq_len
        if self.n < 1:
            raise ConfigError(f"config.data: {what} ({len(data)} bytes) is shorter than one "
                              f"window of data.seq_len + 1 = {seq_len + 1} bytes")

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        s = i * self.seq_len
        return {"tokens": self.data[s:s + self.seq_len + 1].astype(np.int32), "id": np.int32(i)}

    def _getitems(self, indices):
        """Batched read (grain's SupportsBatchedReadRandomAccessDataSource)."""
        return [self[i] for i in indices]
