"""Tokenizers: text <-> the token ids a language model reads (`config.data.tokenizer`).

    bytes                    every byte is a token (vocabulary 256, no special tokens): the
                             default, and what every byte-level config was trained with
    PATH/tokenizer.json      a Hugging Face `tokenizers` file (or a directory holding one; a
                             tokenizer_config.json beside it names the BOS / EOS / pad tokens)
    PATH/tokenizer.model     a SentencePiece model (or any *.model file)

Each gives the vocabulary size, the BOS / EOS / pad ids (None where it has none), encode /
decode, and `token_bytes`: how many bytes of text each token id stands for, so evaluation
reports bits per *byte* whatever the tokenizer (runs with different vocabularies compare).

    python -m trainer.tokenizer train --data.paths=DIR --vocab_size=N OUT

trains a byte-level BPE (the `tokenizers` library; GPT-2's scheme: any text encodes, nothing is
unknown) on the train split of the files and writes OUT/tokenizer.json and
OUT/tokenizer_config.json, which `data.tokenizer=OUT` and transformers' AutoTokenizer both read.
"""
from __future__ import annotations

import abc
import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from trainer.config import ConfigError
from trainer.text import ByteCorpus, text_files

FIELD = "config.data.tokenizer"
EOT = "<|endoftext|>"  # the one special token of the BPE `train` writes (GPT-2's)
# special tokens found by name when no tokenizer_config.json says which is which
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", EOT, "<eos>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(abc.ABC):
    """spec: what data.tokenizer said; files: the files it was read from (export copies them)."""

    spec: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    files: tuple[str, ...] = ()

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ids (special tokens left out)."""

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: the UTF-8 bytes of text each token stands for (0: special)."""

    def document(self, ids: list[int]) -> list[int]:
        """A document's ids as trained on: BOS first (when the tokenizer has one distinct from
        EOS, as Llama's), EOS last (GPT-2's <|endoftext|> separates documents)."""
        head = [self.bos_id] if self.bos_id is not None and self.bos_id != self.eos_id else []
        return head + list(ids) + ([self.eos_id] if self.eos_id is not None else [])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's files ("bytes" for the byte tokenizer): what shards record."""
        h = hashlib.sha256()
        for path in self.files:
            with open(path, "rb") as f:
                h.update(f.read())
        return h.hexdigest() if self.files else self.spec

    def describe(self) -> str:
        return f"{self.spec!r} ({self.vocab_size} tokens)"


class ByteTokenizer(Tokenizer):
    spec, vocab_size = "bytes", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int32)


def _gpt2_byte_map() -> dict[str, int]:
    """The byte-level BPE alphabet (Radford et al. 2019, GPT-2's encoder): byte b is written as
    chr(b) when printable and not a space, else as chr(256 + n) for the n-th other byte;
    {character: byte}."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + n)] = b
            n += 1
    return out


def _special_name(value) -> str | None:
    """tokenizer_config.json's bos_token etc.: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, through the `tokenizers` library."""

    def __init__(self, path: str):
        import tokenizers  # (a dependency; imported here so the byte-level runs never load it)

        self.spec, self.path = path, path
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 -- the library's parse errors have many types
            raise ConfigError(f"{FIELD}={path!r} is not a readable Hugging Face tokenizer.json "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        self.files = (path, config) if os.path.isfile(config) else (path,)
        names = {}
        if os.path.isfile(config):
            with open(config) as f:
                c = json.load(f)
            names = {k: _special_name(c.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
        for key, guesses in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES), ("pad", _PAD_NAMES)):
            name = names.get(key)
            candidates = (name,) if name else guesses
            ids = [self.tok.token_to_id(n) for n in candidates if n is not None]
            setattr(self, f"{key}_id", next((i for i in ids if i is not None), None))
        self._decoder = json.loads(self.tok.to_str()).get("decoder") or {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _decoder_types(self) -> set[str]:
        d = self._decoder
        parts = d.get("decoders", []) if d.get("type") == "Sequence" else [d]
        return {p.get("type") for p in parts}

    def token_bytes(self) -> np.ndarray:
        byte_level = "ByteLevel" in self._decoder_types()
        chars = _gpt2_byte_map()
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or i in self.special:
                continue
            if byte_level and all(c in chars for c in piece):
                out[i] = len(piece)  # one alphabet character per byte
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                out[i] = 1  # SentencePiece-style byte fallback
            else:  # Metaspace ("▁" for a space) or WordPiece ("##" continues a word)
                out[i] = len(piece.removeprefix("##").replace("▁", " ").encode("utf-8"))
        return out


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model (Llama 2's tokenizer.model, T5's spiece.model, ...)."""

    def __init__(self, path: str):
        import sentencepiece  # (a dependency; imported here as HFTokenizer's)

        self.spec, self.path, self.files = path, path, (path,)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:  # noqa: BLE001 -- the library raises RuntimeError / OSError
            raise ConfigError(f"{FIELD}={path!r} is not a readable SentencePiece model "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
        self.vocab_size = self.sp.get_piece_size()
        for key in ("bos", "eos", "pad"):
            i = getattr(self.sp, f"{key}_id")()
            setattr(self, f"{key}_id", i if i >= 0 else None)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts):
        return self.sp.encode(list(texts))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            out[i] = 1 if self.sp.is_byte(i) else len(
                self.sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
        return out


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """data.tokenizer's value -> its Tokenizer (ConfigError naming what is wrong and what is
    allowed). Cached: a run asks for it from several places."""
    if spec in ("", "bytes"):
        return ByteTokenizer()
    path = spec
    if os.path.isdir(spec):
        found = [os.path.join(spec, n) for n in ("tokenizer.json", "tokenizer.model")
                 if os.path.isfile(os.path.join(spec, n))]
        if not found:
            raise ConfigError(f"{FIELD}={spec!r} is a directory without a tokenizer.json or "
                              "tokenizer.model; allowed: 'bytes', a Hugging Face tokenizer.json, "
                              "a SentencePiece .model, or a directory holding one")
        path = found[0]
    elif not os.path.exists(spec):
        raise ConfigError(f"{FIELD}={spec!r} does not exist; allowed: 'bytes', a Hugging Face "
                          "tokenizer.json, a SentencePiece .model, or a directory holding one")
    if path.endswith(".json"):
        return HFTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ConfigError(f"{FIELD}={spec!r}: unknown tokenizer file type; allowed: 'bytes', a "
                      "Hugging Face tokenizer.json (*.json), a SentencePiece model (*.model), "
                      "or a directory holding tokenizer.json / tokenizer.model")


def check_vocab(tokenizer: Tokenizer, vocab_size: int, field: str = "config.model.vocab_size"):
    """The model must have a row for every token id (more rows are padding, as pod configs pad
    vocabularies to a multiple of 128); ConfigError naming both sizes otherwise."""
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{field}={vocab_size} is smaller than the vocabulary of "
                          f"{FIELD}={tokenizer.spec!r} ({tokenizer.vocab_size} tokens); set "
                          f"{field}={tokenizer.vocab_size} (or more: extra rows are padding)")


# ----------------------------------------------------------------------------- training
def train_bpe(texts: Iterable[str], vocab_size: int, out: str, *, min_frequency: int = 2,
              progress: bool = True) -> "HFTokenizer":
    """A byte-level BPE (GPT-2's scheme) trained on texts, saved as out/tokenizer.json and
    out/tokenizer_config.json; returns it loaded."""
    from tokenizers import Tokenizer as Raw, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError(f"--vocab_size={vocab_size}: a byte-level BPE needs >= 257 tokens (the "
                          f"256 bytes and {EOT})")
    tok = Raw(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT,
                   "eos_token": EOT, "unk_token": EOT, "model_max_length": 1 << 20}, f, indent=2)
    load_tokenizer.cache_clear()
    return load_tokenizer(os.path.join(out, "tokenizer.json"))


def documents(paths: Sequence[str], split: str = "train") -> Iterable[str]:
    """The texts of one split of data.paths (the embedded corpus when empty), one per file."""
    corpus = ByteCorpus.from_config(tuple(paths))
    for doc in corpus.documents(split):
        yield doc.tobytes().decode("utf-8", errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.tokenizer",
                                description="Tokenizer tools for the language families.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on text files",
                       description="Trains a byte-level BPE on the train split of the files "
                       "(the split the LM trains on; its held-out files are not read) and "
                       "writes OUT/tokenizer.json + OUT/tokenizer_config.json.")
    t.add_argument("--data.paths", dest="paths", default="",
                   help="text files or directories, comma-separated (default: the embedded "
                        "corpus, the Python standard library's sources)")
    t.add_argument("--vocab_size", type=int, required=True, help="vocabulary size (>= 257)")
    t.add_argument("--min_frequency", type=int, default=2, help="merges seen fewer times are "
                   "not learned")
    t.add_argument("out", help="output directory")
    args = p.parse_args(argv)
    paths = [x for x in args.paths.split(",") if x]
    try:
        if paths:
            text_files(paths)  # missing paths: the config's message
        start = time.perf_counter()
        tok = train_bpe(documents(paths), args.vocab_size, args.out,
                        min_frequency=args.min_frequency, progress=sys.stderr.isatty())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.out, 'tokenizer.json')}: a byte-level BPE of "
          f"{tok.vocab_size} tokens in {time.perf_counter() - start:.1f} s; train with "
          f"--config.data.tokenizer={args.out} --config.model.vocab_size={tok.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
