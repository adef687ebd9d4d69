"""The LM family: KV-cached generation, causality, the byte corpora and per-process batches."""
from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, run_trainer
from models.lm import LM, LMTask, generate
from trainer import load_config
from trainer.data import process_batches
from trainer.text import ByteCorpus, stdlib_files


GPT2 = ["model.norm=layernorm", "model.mlp=gelu", "model.position=learned", "model.rope_theta=0",
        "model.max_len=64", "model.tie_embeddings=true", "model.mlp_dim=256"]


@pytest.fixture(scope="module", params=["softmax", "gla", "hedgehog", "moh", "complexformer",
                                        "gpt2"])
def model_config(request):
    """The tiny LM (2 layers; softmax: GQA with 4 query / 2 key-value heads) with each
    attention mechanism, and in GPT-2 form (LayerNorm, GELU, learned positions, tied head):
    generation and causality must hold for every one."""
    if request.param == "gpt2":
        return load_config(TINY, GPT2).model
    return load_config(TINY, [f"model.attention={request.param}"]).model


@pytest.fixture(scope="module")
def model(model_config):
    return LM(model_config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    """tokens [B, T] -> logits [B, T, V]: the model's full (train-mode, cache-free) forward pass,
    jitted (one compilation per sequence length)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
    return lambda tokens: f(state, tokens)


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(1), (2, 5), 0, 256, jnp.int32)


# ----------------------------------------------------------------------------- the model
def test_kv_cache_generation_equals_full_recompute(model, forward, prompt):
    """Greedy decoding with the KV cache == argmax of a full forward pass over the whole
    sequence at every step, tokens exactly and logits to 1e-4."""
    new = 8
    tokens, logits = generate(model, prompt, new, return_logits=True)
    assert tokens.shape == (2, new) and tokens.dtype == jnp.int32
    assert logits.shape == (2, new, 256)

    seq = prompt
    ref_tokens, ref_logits = [], []
    for _ in range(new):
        last = forward(seq)[:, -1]  # no cache: attention over the whole sequence so far
        nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
        ref_tokens.append(nxt)
        ref_logits.append(last)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(tokens, jnp.stack(ref_tokens, axis=1))
    np.testing.assert_allclose(logits, jnp.stack(ref_logits, axis=1), atol=1e-4, rtol=1e-4)


def test_peer_configs_are_the_peers_gpt():
    """configs/lm.py peer_a / peer_b build ../shared/peers' GPT: its exact parameter counts
    (LayerNorm with bias, 4x GELU MLP, learned positions, tied head, fused-QKV-sized MHA)."""
    for variant, params in (("peer_a", 3_346_944), ("peer_b", 19_149_824)):
        config = load_config(TINY.replace(":tiny", f":{variant}"), [])
        model = nnx.eval_shape(lambda: LM(config.model, rngs=nnx.Rngs(0)))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == params, (variant, n)
        assert model.lm_head is None and model.pos_embed.num_embeddings == config.data.seq_len


def test_architecture_switches_are_validated():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="model.norm='batchnorm': allowed: 'rmsnorm', 'layernorm'"):
        LMTask(load_config(TINY, ["model.norm=batchnorm"])).check(
            {"data": 1, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match="rope_theta=0"):
        LMTask(load_config(TINY, ["model.position=learned", "model.max_len=64"])).validate(
            {"data": 1, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match="max_len=32 .* >= data.seq_len=64"):
        LMTask(load_config(TINY, [*GPT2, "model.max_len=32"])).validate(
            {"data": 1, "fsdp": 1, "tensor": 1})
    model = LM(load_config(TINY, GPT2).model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="65 positions, but the model learned 64"):
        generate(model, jnp.zeros((1, 60), jnp.int32), 5)


def test_top_k_1_sampling_equals_greedy(model, prompt):
    greedy = generate(model, prompt, 6)
    sampled = generate(model, prompt, 6, temperature=0.8, top_k=1, rng=jax.random.key(7))
    np.testing.assert_array_equal(sampled, greedy)


def test_sampling_is_reproducible_per_rng(model, prompt):
    a = generate(model, prompt, 6, temperature=1.0, rng=jax.random.key(3))
    b = generate(model, prompt, 6, temperature=1.0, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    assert int(jnp.min(a)) >= 0 and int(jnp.max(a)) < 256


def test_causal_changing_a_token_leaves_earlier_logits_unchanged(forward):
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256, jnp.int32)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
    before, after = forward(tokens), forward(changed)
    np.testing.assert_allclose(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    # the change is visible from position t on (so the test would notice a broken mask)
    assert float(jnp.max(jnp.abs(after[:, t:] - before[:, t:]))) > 1e-3


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def stdlib_corpus():
    return ByteCorpus.from_files(*stdlib_files())


def test_embedded_corpus_is_deterministic(stdlib_corpus):
    root, names = stdlib_files()
    assert (root, names) == stdlib_files()
    again = ByteCorpus.from_files(root, names)
    np.testing.assert_array_equal(again.train, stdlib_corpus.train)
    np.testing.assert_array_equal(again.eval, stdlib_corpus.eval)
    assert again.train_files == stdlib_corpus.train_files
    assert again.eval_files == stdlib_corpus.eval_files
    # the default (empty data.paths) is this corpus
    default = ByteCorpus.from_config(())
    np.testing.assert_array_equal(default.train, stdlib_corpus.train)


def test_embedded_corpus_split_is_disjoint_by_file(stdlib_corpus):
    c = stdlib_corpus
    root, names = stdlib_files()
    assert not set(c.train_files) & set(c.eval_files)
    assert set(c.train_files) | set(c.eval_files) == set(names)
    assert c.eval_files, "the eval split is empty"
    assert 0.02 <= len(c.eval_files) / len(names) <= 0.10
    # the eval bytes are exactly the eval files' bytes
    assert len(c.eval) == sum(os.path.getsize(os.path.join(root, n)) for n in c.eval_files)
    assert len(c.train) == sum(os.path.getsize(os.path.join(root, n)) for n in c.train_files)
    assert c.train.dtype == np.uint8 and c.eval.dtype == np.uint8


def test_process_batches_partition_the_global_batch(tiny_config):
    """Two processes' local batches, concatenated, are the one-process global batch."""
    ds = LMTask(tiny_config()).train_data()
    g = 8
    single = list(itertools.islice(iter(process_batches(ds, g, process_index=0, process_count=1)), 3))
    halves = [list(itertools.islice(iter(process_batches(ds, g, process_index=p, process_count=2)), 3))
              for p in (0, 1)]
    for b, (h0, h1) in enumerate(zip(*halves)):
        assert len(h0["id"]) == len(h1["id"]) == g // 2
        assert not set(h0["id"].tolist()) & set(h1["id"].tolist())
        np.testing.assert_array_equal(np.concatenate([h0["id"], h1["id"]]), single[b]["id"],
                                      err_msg=f"batch {b}")
        np.testing.assert_array_equal(np.concatenate([h0["tokens"], h1["tokens"]]),
                                      single[b]["tokens"], err_msg=f"batch {b}")
    ids = np.concatenate([b["id"] for b in single])
    assert len(set(ids.tolist())) == len(ids), "examples repeat within the first epoch"


def _write_text_corpus(directory, n_files: int = 3, size: int = 3000) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = [b"def", b"return", b"self", b"import", b"lambda", b"x", b"(", b")", b":", b"\n"]
    for i in range(n_files):
        text = b" ".join(words[j] for j in rng.integers(0, len(words), size))[:size]
        (directory / f"doc{i:02d}.txt").write_bytes(text)


def test_text_file_data_path_trains(tiny_config, tmp_path):
    corpus = tmp_path / "corpus"
    _write_text_corpus(corpus)
    config = tiny_config("train.steps=2", f"data.paths={corpus}")
    task = LMTask(config)
    files = task.corpus.train_files + task.corpus.eval_files
    assert files and all(f.startswith(str(corpus)) for f in files)
    assert len(task.corpus.train) + len(task.corpus.eval) == 3 * 3000

    run = run_trainer(config, tmp_path / "run")
    assert run.result["step"] == 2
    assert np.isfinite(run.result["loss"]) and np.isfinite(run.result["eval"]["loss"])


def test_text_corpus_split_does_not_depend_on_directory_location(tmp_path):
    """The same files under two different directories give the same train/eval split (the
    split may depend on file names, not on where the corpus lives or how the path is spelt)."""
    a, b = tmp_path / "a" / "corpus", tmp_path / "elsewhere" / "corpus"
    _write_text_corpus(a, n_files=40, size=200)
    _write_text_corpus(b, n_files=40, size=200)
    ca, cb = ByteCorpus.from_config([str(a)]), ByteCorpus.from_config([str(b)])
    assert [os.path.basename(f) for f in ca.eval_files] == [os.path.basename(f) for f in cb.eval_files]
    np.testing.assert_array_equal(ca.train, cb.train)
    np.testing.assert_array_equal(ca.eval, cb.eval)


def _meta_llama3_scaling(freqs, factor, low, high, old_len):
    """Meta's llama3 `apply_scaling`, one frequency at a time (the independent reference)."""
    import math
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_llama3_rope_scaling_matches_metas_formula():
    import math

    from attention.ops.rope import Llama3Scaling, rope_frequencies

    d, theta = 128, 500000.0  # Llama 3.1's head dim and base: all three bands occur
    plain = np.asarray(rope_frequencies(d, theta), np.float64)
    scaled = np.asarray(rope_frequencies(d, theta, Llama3Scaling(8.0, 1.0, 4.0, 8192)))
    want = _meta_llama3_scaling(plain, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(scaled, want, rtol=2e-6)
    wavelen = 2 * math.pi / plain
    bands = [(wavelen < 8192 / 4).sum(), (wavelen > 8192).sum()]
    assert min(bands) > 0 and sum(bands) < d // 2  # kept, stretched and interpolated ones


def test_llama_switches_reach_the_model():
    from trainer.config import ConfigError

    base = load_config(TINY, [])
    scaled = load_config(TINY, ["model.rope_scaling=llama3", "model.rope_original_max_len=16",
                                "model.rope_scaling_factor=4", "model.norm_eps=1e-5"])
    tokens = jnp.asarray(np.arange(48, dtype=np.int32)[None] % 256)
    a, b = LM(base.model, rngs=nnx.Rngs(0)), LM(scaled.model, rngs=nnx.Rngs(0))
    assert b.blocks[0].attn_norm.epsilon == 1e-5 and a.blocks[0].attn_norm.epsilon == 1e-6
    la, lb = a(tokens)[0], b(tokens)[0]
    assert not np.allclose(la, lb, atol=1e-4)  # stretched low frequencies change the scores
    with pytest.raises(ConfigError, match="rope_high_freq_factor=1.0 must be > "):
        LMTask(load_config(TINY, ["model.rope_scaling=llama3",
                                  "model.rope_high_freq_factor=1"])).check(
            {"data": 1, "fsdp": 1, "tensor": 1})


def test_bias_switches_reach_the_model():
    """model.mlp_bias (either MLP) and softmax attention's model.softmax_bias add the biases of a
    GPT-2 checkpoint, and nothing else; model.norm_eps reaches the LayerNorm too."""
    def params(*overrides):
        cfg = load_config(TINY, list(overrides)).model
        model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
        return model, {"/".join(map(str, p)): v.shape
                       for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    _, plain = params(*GPT2)
    model, biased = params(*GPT2, "model.mlp_bias=true", "model.softmax_bias=true",
                           "model.norm_eps=1e-6")
    assert model.blocks[0].attn_norm.epsilon == 1e-6 and model.final_norm.epsilon == 1e-6
    assert set(plain) < set(biased)
    assert {n: s for n, s in biased.items() if n not in plain} == {
        f"blocks/{i}/{layer}/bias": (size,) for i in range(2) for layer, size in (
            ("mlp/fc", 256), ("mlp/proj", 64), ("attn/q_proj", 64), ("attn/k_proj", 32),
            ("attn/v_proj", 32), ("attn/o_proj", 64))}
    _, plain = params()
    _, biased = params("model.mlp_bias=true")
    assert {n for n in biased if n not in plain} == {
        f"blocks/{i}/mlp/{w}/bias" for i in range(2) for w in ("w1", "w2", "w3")}
