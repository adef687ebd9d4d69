"""Input pipelines: Grain datasets, per-process sharding, global arrays (text corpora: trainer/text.py).

A Task hands the Trainer an *example*-level `grain.MapDataset`; `process_batches` turns it into
the host-local batches of this process such that the global batch is the same whatever the
number of processes (global batch b is examples [b*G, (b+1)*G) of the task's dataset, and process
p reads rows [p*G/P, (p+1)*G/P) of it). `global_batch` assembles the device arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
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
