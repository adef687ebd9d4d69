"""Text corpora for the language families: files, the embedded corpus (the Python standard
library's sources), the train/eval split by file, windows of tokens; the byte-level view
(ByteCorpus) and the tokenized one (trainer/tokenizer.py's tokenizers; pre-tokenized shards
written by `python -m trainer.data prepare`)."""
from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trainer.config import ConfigError


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
