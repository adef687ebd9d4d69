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
                    first_example: int = 0) -> grain.IterDataset:
    """Host-local batches (dicts of arrays with leading dim global_batch / process_count), from
    example `first_example` of `ds` on (a resume whose global batch changed goes on there)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch % n:
        raise ConfigError(f"config.train.global_batch_size={global_batch} is not divisible by "
                          f"the {n} processes")
    local = _ProcessBatches(ds, global_batch, p, n, first_example)
    return local.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


def global_batch(local: dict[str, np.ndarray], shardings: dict, batch_axis: int = 0
                 ) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays with the given per-key shardings; the
    processes' rows are concatenated along `batch_axis`. One call for the whole dict: a single
    batched transfer."""
    gshapes = {k: x.shape[:batch_axis] + (x.shape[batch_axis] * jax.process_count(),)
               + x.shape[batch_axis + 1:] for k, x in local.items()}
    return jax.make_array_from_process_local_data(shardings, local, gshapes)


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
        return cls.from_files("", [f for f, _ in files], [k for _, k in files])


_CACHE: dict = {}


def _stdlib_corpus() -> ByteCorpus:
    if "stdlib" not in _CACHE:
        _CACHE["stdlib"] = ByteCorpus.from_files(*stdlib_files())
    return _CACHE["stdlib"]


class ByteWindows:
    """Non-overlapping windows of seq_len + 1 bytes: example i = data[i*T : i*T + T + 1]."""

    def __init__(self, data: np.ndarray, seq_len: int):
        self.data, self.seq_len = data, seq_len
        self.n = (len(data) - 1) // seq_len
        if self.n < 1:
            raise ConfigError(f"config.data: the corpus ({len(data)} bytes) is shorter than one "
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
