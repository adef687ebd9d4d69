"""Text corpora for the language families: files, the embedded corpus (the Python standard
library's sources), the train/eval split by file, windows of tokens; the byte-level view
(ByteCorpus) and the tokenized one (trainer/tokenizer.py's tokenizers; pre-tokenized shards
written by `python -m trainer.data prepare`)."""
from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Sequence

import grain
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
    """Byte-level train/eval corpora (uint8 arrays) split by file; *_sizes: the bytes of each
    document (a file, or its part under the 10% split), in order."""
    train: np.ndarray
    eval: np.ndarray
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    train_sizes: tuple[int, ...] = ()
    eval_sizes: tuple[int, ...] = ()

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
                   eval_files=tuple(n for n, _ in parts[True]),
                   train_sizes=tuple(len(b) for _, b in parts[False]),
                   eval_sizes=tuple(len(b) for _, b in parts[True]))

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

    def documents(self, split: str) -> list[np.ndarray]:
        """The split's documents (uint8 views, one per file or file part), in order."""
        data, sizes = (self.train, self.train_sizes) if split == "train" else (
            self.eval, self.eval_sizes)
        ends = np.cumsum(sizes)
        return [data[e - n:e] for n, e in zip(sizes, ends)]

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


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens: example i = data[i*T : i*T + T + 1].
    data: any sliceable 1-D sequence of token ids (a byte array, a tokenized corpus, shards)."""

    def __init__(self, data, seq_len: int, what: str = "the corpus", unit: str = "bytes"):
        self.data, self.seq_len = data, seq_len
        self.n = (len(data) - 1) // seq_len
        if self.n < 1:
            raise ConfigError(f"config.data: {what} ({len(data)} {unit}) is shorter than one "
                              f"window of data.seq_len + 1 = {seq_len + 1} {unit}")

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        s = i * self.seq_len
        return {"tokens": self.data[s:s + self.seq_len + 1].astype(np.int32), "id": np.int32(i)}

    def _getitems(self, indices):
        """Batched read (grain's SupportsBatchedReadRandomAccessDataSource)."""
        return [self[i] for i in indices]


# ----------------------------------------------------------------------------- tokenized text
def token_dtype(vocab_size: int):
    """The narrowest unsigned dtype holding every id (half the memory of int32 for < 65,536)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_documents(docs: Sequence[np.ndarray], tokenizer, batch: int = 256) -> np.ndarray:
    """The ids of documents (UTF-8 byte arrays) as one stream, each document framed by
    tokenizer.document (BOS / EOS); the tokenizer's dtype (token_dtype)."""
    out = []
    for i in range(0, len(docs), batch):
        texts = [d.tobytes().decode("utf-8", errors="replace") for d in docs[i:i + batch]]
        out += [np.asarray(tokenizer.document(ids), token_dtype(tokenizer.vocab_size))
                for ids in tokenizer.encode_batch(texts)]
    return np.concatenate(out) if out else np.zeros(0, token_dtype(tokenizer.vocab_size))


def tokenized(corpus: ByteCorpus, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, eval ids) of a byte corpus; the byte tokenizer's are the bytes themselves.
    The embedded corpus's are cached per tokenizer (it tokenizes once per process)."""
    if tokenizer.spec == "bytes":
        return corpus.train, corpus.eval
    key = ("tokens", tokenizer.fingerprint)
    if corpus is not _CACHE.get("stdlib") or key not in _CACHE:
        ids = (tokenize_documents(corpus.documents("train"), tokenizer),
               tokenize_documents(corpus.documents("eval"), tokenizer))
        if corpus is not _CACHE.get("stdlib"):
            return ids
        _CACHE[key] = ids
    return _CACHE[key]


# ----------------------------------------------------------------------------- shards
MANIFEST = "manifest.json"
SHARD_FORMAT = "polyformer-tokens/1"


def is_shards(paths: Sequence[str]) -> bool:
    """data.paths names a directory written by `python -m trainer.data prepare`."""
    return len(paths) == 1 and os.path.isfile(os.path.join(paths[0], MANIFEST))


class ShardStream:
    """One split of pre-tokenized shards as a sliceable token sequence: ArrayRecord records
    (random access, grain's format) of manifest["chunk_tokens"] ids each, the stream's order;
    a slice reads only the records it spans."""

    def __init__(self, root: str, split: dict, chunk: int, dtype: str):
        self.files = [os.path.join(root, f) for f in split["files"]]
        self.n, self.chunk, self.dtype = int(split["tokens"]), int(chunk), np.dtype(dtype)
        self.source = grain.sources.ArrayRecordDataSource(self.files) if self.files else None

    def __len__(self):
        return self.n

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(self.n)
        if stop <= start:
            return np.zeros(0, self.dtype)
        first, last = start // self.chunk, (stop - 1) // self.chunk
        ids = np.concatenate([np.frombuffer(self.source[r], self.dtype)
                              for r in range(first, last + 1)])
        return ids[start - first * self.chunk:stop - first * self.chunk]


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.data.paths: {path!r} cannot be read ({e}); write the shards "
                          "again with `python -m trainer.data prepare`") from None
    if manifest.get("format") != SHARD_FORMAT:
        raise ConfigError(f"config.data.paths: {path!r} is format {manifest.get('format')!r}; "
                          f"this version reads {SHARD_FORMAT!r}")
    missing = [f for s in manifest["splits"].values() for f in s["files"]
               if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise ConfigError(f"config.data.paths: {len(missing)} shard file(s) of {root!r} are "
                          f"missing ({', '.join(missing[:5])}); copy the whole directory or "
                          "prepare it again")
    return manifest


def shard_tokens(root: str, tokenizer) -> tuple[ShardStream, ShardStream]:
    """(train, eval) streams of a prepared directory, refusing shards tokenized by another
    tokenizer than data.tokenizer (their ids would mean other text)."""
    m = read_manifest(root)
    if m["tokenizer_sha256"] != tokenizer.fingerprint:
        hint = (f"set config.data.tokenizer={os.path.join(root, 'tokenizer')!r} (the copy the "
                "shards keep)" if m["tokenizer"] != "bytes" else "set config.data.tokenizer=bytes")
        raise ConfigError(f"config.data.paths={root!r} was tokenized with {m['tokenizer']!r} "
                          f"(sha256 {m['tokenizer_sha256'][:12]}), not config.data.tokenizer="
                          f"{tokenizer.spec!r}: {hint}")
    return tuple(ShardStream(root, m["splits"][s], m["chunk_tokens"], m["dtype"])
                 for s in ("train", "eval"))
