"""Tokenizers and pre-tokenized shards (issue 26 items 4 and 5): data.tokenizer = bytes | a
Hugging Face tokenizer.json | a SentencePiece .model; `python -m trainer.tokenizer train`;
`python -m trainer.data prepare`; bits per byte whatever the tokenizer."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, make_tiny_config, run_trainer
from trainer.config import ConfigError
from trainer.data import prepare
from trainer.text import ByteCorpus, shard_tokens, tokenized
from trainer.tokenizer import load_tokenizer, train_bpe

# text with multi-byte characters: a token's bytes are counted, not its characters
TEXTS = ["def naïve(café):\n    return '日本語' * 3  # ünïcödé\n" * 30,
         "the quick brown fox jumps over the lazy dog. " * 40,
         "import os\nprint(os.path.join('a', 'b'))\n" * 25]


def write_corpus(root, n: int = 12) -> str:
    """n small text files (enough that the split by file holds some out)."""
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, f"doc{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(TEXTS[i % len(TEXTS)] + f"# file {i}\n")
    return str(root)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 300-token byte-level BPE trained on TEXTS."""
    out = str(tmp_path_factory.mktemp("bpe"))
    return train_bpe(TEXTS, 300, out, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def assert_round_trip_and_bytes(tok, text: str):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # every token's bytes add up to the text's UTF-8 bytes (bits per byte stay exact)
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_byte_tokenizer_is_the_identity():
    tok = load_tokenizer("bytes")
    assert tok.vocab_size == 256 and tok.bos_id is tok.eos_id is None
    assert tok.encode("é") == [0xC3, 0xA9]
    assert_round_trip_and_bytes(tok, TEXTS[0])


def test_trained_bpe_round_trips_counts_bytes_and_names_its_special_token(bpe):
    assert bpe.vocab_size == 300
    assert bpe.eos_id == bpe.bos_id == 0  # <|endoftext|>, GPT-2's document separator
    for text in TEXTS + ["unseen text: Ωμέγα ✓ \x00\x01"]:
        assert_round_trip_and_bytes(bpe, text)
    assert len(bpe.encode(TEXTS[1])) < len(TEXTS[1]) / 2  # merges learned
    assert bpe.token_bytes()[bpe.eos_id] == 0
    assert bpe.document([5, 6]) == [5, 6, 0]  # EOS closes a document, no BOS (= EOS)
    # a directory and its tokenizer.json are the same tokenizer
    assert load_tokenizer(os.path.dirname(bpe.spec)).fingerprint == bpe.fingerprint


def test_metaspace_tokenizer_json_counts_bytes(tmp_path):
    """A SentencePiece-style tokenizer.json ("▁" for spaces, byte fallback), as Llama 2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + alphabet, show_progress=False))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    t = load_tokenizer(path)
    assert (t.bos_id, t.eos_id) == (1, 2)  # found by name: no tokenizer_config.json
    ids = t.encode("quick fox")
    assert t.decode(ids) == "quick fox"
    # "▁quick" stands for " quick": the leading space the decoder strips is counted too
    assert int(t.token_bytes()[ids].sum()) == len(" quick fox")
    rare = t.encode("日")  # not in the merges: byte fallback tokens, one byte each
    assert int(t.token_bytes()[rare].sum()) in (3, 4)


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 3), model_prefix=prefix,
                                   vocab_size=400, byte_fallback=True, minloglevel=2,
                                   hard_vocab_limit=False)
    t = load_tokenizer(prefix + ".model")
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, None)
    text = "the lazy dog 日本"
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert int(t.token_bytes()[ids].sum()) == len((" " + text).encode())  # SentencePiece's "▁"
    assert t.document([7]) == [1, 7, 2]


def test_bad_tokenizer_specs_name_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; allowed: 'bytes'"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="directory without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ConfigError, match="unknown tokenizer file type"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "x.model").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="not a readable SentencePiece model"):
        load_tokenizer(str(tmp_path / "x.model"))


def test_tokenizer_train_command(tmp_path, corpus):
    out = tmp_path / "tok"
    p = subprocess.run([sys.executable, "-m", "trainer.tokenizer", "train",
                        f"--data.paths={corpus}", "--vocab_size=280", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "--config.model.vocab_size=280" in p.stdout
    assert load_tokenizer(str(out)).vocab_size == 280
    bad = subprocess.run([sys.executable, "-m", "trainer.tokenizer", "train",
                          "--vocab_size=100", str(tmp_path / "t2")], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and ">= 257 tokens" in bad.stderr


# ----------------------------------------------------------------------------- training
def bpe_config(bpe, corpus, *overrides):
    return make_tiny_config(f"data.tokenizer={os.path.dirname(bpe.spec)}",
                            "model.vocab_size=300", f"data.paths={corpus}", *overrides)


def test_model_vocabulary_must_hold_the_tokenizer(bpe, corpus, tmp_path):
    from trainer import Trainer

    config = make_tiny_config(f"data.tokenizer={bpe.spec}", f"data.paths={corpus}")
    with pytest.raises(ConfigError, match=r"model.vocab_size=256 is smaller than the vocabulary "
                                          r".* \(300 tokens\); set config.model.vocab_size=300"):
        Trainer(config, str(tmp_path / "run"), quiet=True)


def test_bits_per_byte_are_normalised_by_the_text_bytes(bpe, corpus):
    """eval's bits per byte = total nll / (ln 2 * bytes of the evaluated text), the bytes
    counted from the tokens; with bytes it stays nll / ln 2."""
    from models.lm import LMTask

    task = LMTask(bpe_config(bpe, corpus))
    train, _ = task.tokens
    window = np.asarray(train[:33], np.int32)[None]
    batch = {"tokens": window}
    model = task.build_model(nnx.Rngs(0))
    loss, metrics = task.loss(model, batch)
    want = bpe.token_bytes()[window[0, 1:]].mean()
    assert float(metrics["bytes_per_token"]) == pytest.approx(want, rel=1e-6)
    summary = task.eval_summary({"loss": float(loss), "nll": float(loss),
                                 "bytes_per_token": float(want)})
    assert summary["bits_per_byte"] == pytest.approx(float(loss) / math.log(2) / want)
    byte_task = LMTask(make_tiny_config())
    byte_model = byte_task.build_model(nnx.Rngs(0))
    assert "bytes_per_token" not in byte_task.loss(byte_model, {"tokens": window % 256})[1]


def test_shards_hold_the_same_stream_as_the_text_and_train_identically(bpe, corpus, tmp_path):
    out = str(tmp_path / "shards")
    m = prepare([corpus], os.path.dirname(bpe.spec), out, chunk_tokens=64, file_tokens=256,
                progress=False)
    byte_corpus = ByteCorpus.from_config([corpus])
    want_train, want_eval = tokenized(byte_corpus, bpe)
    train, ev = shard_tokens(out, load_tokenizer(os.path.join(out, "tokenizer")))
    assert np.array_equal(train[0:len(train)], want_train)
    assert np.array_equal(ev[0:len(ev)], want_eval)
    assert np.array_equal(train[61:130], want_train[61:130])  # a slice across records
    assert len(m["splits"]["train"]["files"]) > 1  # rotated every 256 ids
    assert m["splits"]["train"]["bytes"] == len(byte_corpus.train)
    assert m["splits"]["eval"]["bytes"] == len(byte_corpus.eval) > 0
    assert m["tokenizer_sha256"] == bpe.fingerprint
    assert json.load(open(os.path.join(out, "manifest.json"))) == m

    steps = ("train.steps=3",)
    from_text = run_trainer(bpe_config(bpe, corpus, *steps), tmp_path / "a")
    from_shards = run_trainer(make_tiny_config(
        f"data.tokenizer={os.path.join(out, 'tokenizer')}", "model.vocab_size=300",
        f"data.paths={out}", *steps), tmp_path / "b")
    assert from_text.losses == from_shards.losses
    for a, b in zip(from_text.ids, from_shards.ids):
        assert np.array_equal(a, b)


def test_prepare_refuses_what_would_lose_or_mix_data(bpe, corpus, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        prepare([corpus], bpe.spec, str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    good = str(tmp_path / "good")
    prepare([corpus], "bytes", good, progress=False)
    with pytest.raises(ConfigError, match=r"tokenized with 'bytes'.*set config.data.tokenizer=bytes"):
        shard_tokens(good, bpe)
    os.remove(os.path.join(good, "train-00000.array_record"))
    with pytest.raises(ConfigError, match="shard file\\(s\\) of .* are missing"):
        shard_tokens(good, load_tokenizer("bytes"))


def test_prepare_command(tmp_path, corpus):
    out = tmp_path / "sh"
    p = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", f"--data.paths={corpus}",
                        str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"--config.data.paths={out}" in p.stdout
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["tokenizer"] == "bytes" and manifest["dtype"] == "uint16"
    again = subprocess.run([sys.executable, "-m", "trainer.data", "prepare",
                            f"--data.paths={corpus}", str(out)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not an empty directory" in again.stderr


def test_shard_batches_split_across_processes_and_resume_at_an_example(bpe, corpus, tmp_path):
    """Per-process reading and the examples-based resume position, on a shard-backed stream:
    process p of P reads rows [p G / P, (p + 1) G / P) of each global batch; a run resumed at
    example 8 reads the second batch."""
    from models.lm import LMTask
    from trainer.data import process_batches

    out = str(tmp_path / "shards")
    prepare([corpus], os.path.dirname(bpe.spec), out, chunk_tokens=64, progress=False)
    task = LMTask(make_tiny_config(f"data.tokenizer={os.path.join(out, 'tokenizer')}",
                                   "model.vocab_size=300", f"data.paths={out}"))
    ds = task.train_data()
    whole = iter(process_batches(ds, 8, process_index=0, process_count=1))
    first, second = next(whole), next(whole)
    halves = [next(iter(process_batches(ds, 8, process_index=p, process_count=2)))
              for p in (0, 1)]
    assert np.array_equal(np.concatenate([h["tokens"] for h in halves]), first["tokens"])
    resumed = next(iter(process_batches(ds, 8, process_index=0, process_count=1,
                                        first_example=8)))
    assert np.array_equal(resumed["tokens"], second["tokens"])
