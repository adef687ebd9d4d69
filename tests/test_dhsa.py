"""DHSA (attention/dhsa.py): the chunk representations and their upsampled scores, the top-N
block selection, the layer against SoftmaxAttention on the same parameters, a tiny LM prefill."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, check_sparse_prefill_lm, jit_apply
from attention import registry
from attention.dhsa import (DHSAAttention, dhsa_block_mask, dhsa_block_scores,
                            dhsa_chunk_scores, dhsa_token_scores)
from attention.hip import fixed_blocks
from attention.ops.block_sparse import block_sparse_attention
from attention.softmax import SoftmaxAttention
from trainer import load_config


def dhsa_cfg(**opts):
    """The tiny LM's config.model with attention "dhsa" (which brings in its CONFIG_DEFAULTS as
    fields) and `opts` set through command-line style overrides."""
    return load_config(TINY, ["model.attention=dhsa",
                              *(f"model.{k}={v}" for k, v in opts.items())]).model


def make(cfg, cls=DHSAAttention, seed=0):
    with nnx.use_eager_sharding(False):  # parameters carry logical axes; no mesh here
        return cls(cfg, rngs=nnx.Rngs(seed))


def layer_pair(cfg):
    """(DHSAAttention, SoftmaxAttention) holding the same parameters."""
    dhsa, soft = make(cfg, seed=1), make(cfg, SoftmaxAttention)
    nnx.update(dhsa, nnx.state(soft, nnx.Param))
    return dhsa, soft


def qkv(B=2, T=200, H=4, Hk=2, D=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, Hk, D)),
            jax.random.normal(ks[2], (B, T, Hk, D)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_validation():
    assert registry.get("dhsa") is DHSAAttention
    m = dhsa_cfg()
    assert {k: m[k] for k in DHSAAttention.CONFIG_DEFAULTS} == DHSAAttention.CONFIG_DEFAULTS
    layer = make(dhsa_cfg(dhsa_chunk_size=8, dhsa_topk=64))
    assert (layer.dhsa_chunk_size, layer.dhsa_topk) == (8, 64)
    with pytest.raises(ValueError, match="dhsa_chunk_size"):
        make(dhsa_cfg(dhsa_chunk_size=24))                            # does not divide 64
    with pytest.raises(ValueError, match="dhsa_chunk_size"):
        make(dhsa_cfg(dhsa_chunk_size=0))


# ----------------------------------------------------------------------------- the scores
def test_chunk_scores_length_normalised_and_upsampled_constant():
    T, c = 30, 4                                                              # last chunk: 2 tokens
    q, k, _ = qkv(B=1, T=T)
    sc, tok = jax.jit(lambda q, k: (dhsa_chunk_scores(q, k, c), dhsa_token_scores(q, k, c)))(q, k)
    sc, tok = np.asarray(sc), np.asarray(tok)                   # [1, H, NC, NC], [1, H, T, T]
    qn, kn = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]
    nc = -(-T // c)
    size = np.array([min(c, T - i * c) for i in range(nc)])
    qc = np.stack([qn[i * c:(i + 1) * c].mean(0) * np.sqrt(size[i]) for i in range(nc)])
    kc = np.stack([kn[i * c:(i + 1) * c].mean(0) * np.sqrt(size[i]) for i in range(nc)])
    kc = np.repeat(kc, 2, axis=1)                               # GQA: 4 query / 2 kv heads
    expected = np.einsum("ihd,jhd->hij", qc, kc)
    causal = np.arange(nc)[None, :] <= np.arange(nc)[:, None]
    np.testing.assert_allclose(sc[0][:, causal], expected[:, causal], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(sc[0][:, ~causal]))
    # upsampled: S[i, j] = S_c[i // c, j // c], constant on every chunk x chunk tile
    ci = np.arange(T) // c
    np.testing.assert_array_equal(tok[0], sc[0][:, ci][:, :, ci])
    for a in range(nc):
        for b in range(a + 1):
            tile = tok[0, :, a * c:(a + 1) * c, b * c:(b + 1) * c]
            assert np.all(tile == tile[:, :1, :1])
    # chunk size 1: the token-level causal scores q k^T
    one = np.asarray(dhsa_token_scores(q, k, 1))[0]
    qk = np.einsum("ihd,jhd->hij", qn, np.repeat(kn, 2, axis=1))
    tri = np.tril(np.ones((T, T), bool))
    np.testing.assert_allclose(one[:, tri], qk[:, tri], rtol=1e-5, atol=1e-5)


def test_block_scores_pool_the_token_scores():
    """Block score = mean over the query block's tokens of the max over the key block's tokens
    of the upsampled (token-level) scores, where any key of the block is causal."""
    T, c, bq, bk = 96, 4, 16, 8
    q, k, _ = qkv(B=1, T=T)
    bs, tok = jax.jit(lambda q, k: (dhsa_block_scores(q, k, chunk=c, block_q=bq, block_k=bk),
                                    dhsa_token_scores(q, k, c)))(q, k)
    tok = np.asarray(tok)[0]                                                  # [H, T, T]
    m = tok.reshape(4, T, T // bk, bk).max(-1)                                # [H, T, NK]
    m = m.reshape(4, T // bq, bq, T // bk)
    ok = np.isfinite(m)
    expected = np.where(ok.any(2), np.where(ok, m, 0).sum(2) / np.maximum(ok.sum(2), 1), -np.inf)
    np.testing.assert_allclose(np.asarray(bs)[0], expected, rtol=1e-5, atol=1e-5)


def test_selected_blocks_causal_with_local_window():
    T, c, bq, bk, window, n = 300, 4, 16, 16, 40, 2
    q, k, _ = qkv(B=2, T=T, seed=1)
    kw = dict(chunk=c, block_q=bq, block_k=bk)
    scores, mask = jax.jit(lambda q, k: (
        dhsa_block_scores(q, k, **kw),
        dhsa_block_mask(q, k, top_k_tokens=n * bk, window=window, **kw)))(q, k)
    nq = nk = -(-T // bq)
    causal, fixed = fixed_blocks(nq, nk, bq, bk, window=window)
    dense = np.asarray(mask.to_dense())                                       # [B, H, NQ, NK]
    assert not np.any(dense & ~causal)                                        # causal
    assert np.all(dense[..., fixed])                                          # diag + window
    # the window: every key block overlapping the last `window` tokens before each query block
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    recent = ((j + 1) * bk - 1 >= i * bq - window + 1) & (j * bk <= i * bq)
    assert np.all(dense[..., recent & causal])
    # beyond them: exactly the top-n causal blocks by block score
    cand = causal & ~fixed
    s = np.where(cand, np.asarray(scores), -np.inf)
    rank = np.argsort(np.argsort(-s, axis=-1), axis=-1)
    np.testing.assert_array_equal(dense & cand, cand & (rank < n))
    np.testing.assert_array_equal((dense & cand).sum(-1),
                                  np.broadcast_to(np.minimum(cand.sum(-1), n), (2, 4, nq)))
    cnt, ind = np.asarray(mask.counts), np.asarray(mask.indices)
    slot = np.arange(ind.shape[-1]) < cnt[..., None]
    assert np.all(~slot[..., 1:] | (np.diff(ind, axis=-1) > 0))               # sorted, unique
    assert mask.max_blocks <= fixed.sum(-1).max() + n < nk


def test_a_planted_relevant_chunk_is_selected():
    """Keys of one distant chunk aligned with every query: its key block wins the top-1 budget
    for every later query block beyond the window (the chunk-level scores find it)."""
    T, D, c, b = 512, 16, 4, 16
    u = jnp.zeros(D).at[0].set(1.0)
    noise = jax.random.normal(jax.random.key(0), (2, 1, T, 1, D)) * 0.3
    q = u + noise[0]
    for start in (100, 260):
        k = (noise[1] + 3.0 * u * ((jnp.arange(T) >= start) & (jnp.arange(T) < start + c))
             [None, :, None, None])
        mask = jax.jit(lambda q, k: dhsa_block_mask(q, k, chunk=c, top_k_tokens=b, block_q=b,
                                                    block_k=b, window=b))(q, k)
        dense = np.asarray(mask.to_dense())[0, 0]                             # [NQ, NK]
        later = np.arange(dense.shape[0]) * b > start + c + b                 # beyond the window
        assert np.all(dense[later, start // b]), start


# ----------------------------------------------------------------------------- the layer
def test_chunk_size_one_full_budget_equals_dense_softmax():
    cfg = dhsa_cfg(dhsa_chunk_size=1, dhsa_topk=4096, dhsa_block_q=16, dhsa_block_k=8,
                   dhsa_window=16, dhsa_in_train=True)
    dhsa, soft = layer_pair(cfg)
    B, T = 2, 200                                                             # a partial q block
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def run(layer, x):
        pre = layer(x, positions=pos, cache=layer.init_cache(B, T), mode="prefill")[0]
        return pre, layer(x, positions=pos, mode="train")[0]

    (pre, train), (dense, _) = jit_apply(dhsa, run, x), jit_apply(soft, run, x)
    assert rel_err(pre, dense) < 1e-5
    assert rel_err(train, dense) < 1e-5                                       # dhsa_in_train


def test_small_budget_is_the_op_on_the_mask():
    cfg = dhsa_cfg(dhsa_chunk_size=4, dhsa_topk=16, dhsa_block_q=16, dhsa_block_k=16,
                   dhsa_window=16, sparse_impl="xla")
    dhsa, _ = layer_pair(cfg)
    assert not dhsa.in_train
    q, k, v = qkv(B=2, T=256, H=dhsa.num_heads, Hk=dhsa.num_kv_heads, D=dhsa.head_dim, seed=3)

    def run(layer, q, k, v):
        mask = layer.block_mask(q, k)
        return (layer.attend(q, k, v, mode="prefill"), mask,
                block_sparse_attention(q, k, v, mask, causal=True, impl="reference"),
                layer.attend(q, k, v, mode="train"))

    out, mask, ref, train = jit_apply(dhsa, run, q, k, v)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert float(mask.density().max()) < 0.5 * 0.6                           # well below causal
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, dense) > 1e-2
    assert rel_err(train, dense) < 1e-5                                       # train stays dense


def test_tiny_lm_prefill_and_generation():
    """The tiny LM with DHSA loads the softmax LM's parameters unchanged; with a full budget its
    prefill logits equal the softmax LM's; with a small one prefill is sparse and generation
    runs."""
    check_sparse_prefill_lm(dhsa_cfg, dict(dhsa_chunk_size=4, dhsa_block_q=16, dhsa_block_k=16,
                                           dhsa_window=16), "dhsa_topk")
