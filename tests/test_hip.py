"""HiP (attention/hip.py): the hierarchical top-k block selection, its BlockMask (shared helpers),
the layer against SoftmaxAttention on the same parameters, and a tiny LM prefill."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, check_sparse_prefill_lm, jit_apply
from attention import registry
from attention.hip import (HiPAttention, fixed_blocks, hip_block_mask, hip_search_range,
                           hip_select, selection_block_mask, topk_block_mask)
from attention.ops.block_sparse import block_sparse_attention
from attention.softmax import SoftmaxAttention
from trainer import load_config


def hip_cfg(**opts):
    """The tiny LM's config.model with attention "hip" (which brings in its CONFIG_DEFAULTS as
    fields) and `opts` set through command-line style overrides."""
    return load_config(TINY, ["model.attention=hip",
                              *(f"model.{k}={v}" for k, v in opts.items())]).model


def qkv(B=2, T=200, H=4, Hk=2, D=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, Hk, D)),
            jax.random.normal(ks[2], (B, T, Hk, D)))


def layer_pair(cfg):
    """(HiPAttention, SoftmaxAttention) holding the same parameters (the softmax state loads
    into HiP unchanged)."""
    with nnx.use_eager_sharding(False):
        hip = HiPAttention(cfg, rngs=nnx.Rngs(1))
        soft = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
    nnx.update(hip, nnx.state(soft, nnx.Param))
    return hip, soft


def make(cfg):
    with nnx.use_eager_sharding(False):  # parameters carry logical axes; no mesh here
        return HiPAttention(cfg, rngs=nnx.Rngs(0))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_overrides():
    """`model.attention=hip` brings in CONFIG_DEFAULTS as config.model fields, overridable from
    the command line; without those fields the layer falls back to the same defaults; bad values
    fail naming the field."""
    assert registry.get("hip") is HiPAttention
    m = hip_cfg()
    assert (m.hip_mask_k, m.hip_block_q, m.hip_block_k, m.hip_rep_tokens, m.hip_window,
            m.hip_sink, m.hip_in_train, m.sparse_impl) == (512, 64, 64, 2, 256, 16, False, "auto")
    bare = load_config(TINY, []).model.to_dict()
    layer = make(ml_collections.ConfigDict(dict(bare, attention="hip")))
    assert all(getattr(layer, key) == v for key, v in HiPAttention.CONFIG_DEFAULTS.items())
    layer = make(hip_cfg(hip_mask_k=128, hip_in_train=True))
    assert layer.hip_mask_k == 128 and layer.in_train is True
    with pytest.raises(ValueError, match="sparse_impl"):
        make(hip_cfg(sparse_impl="cuda"))
    with pytest.raises(ValueError, match="hip_block_k"):
        make(hip_cfg(hip_block_k=0))
    assert make(hip_cfg(hip_mask_k=0)).hip_mask_k == 0  # no search: sinks + window (a control)
    with pytest.raises(ValueError, match="hip_mask_k=-1"):
        make(hip_cfg(hip_mask_k=-1))
    with pytest.raises(ValueError, match="hip_window"):
        make(hip_cfg(hip_window=-1))


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("T,bq,bk", [(1000, 32, 16), (777, 16, 32)])
def test_selected_blocks_unique_sorted_causal(T, bq, bk):
    q, k, _ = qkv(B=1, T=T)
    kw = dict(mask_k=4 * bk, block_q=bq, block_k=bk, sink_tokens=16, window=64)
    idx, mask = jax.jit(lambda q, k: (hip_select(q, k, **kw), hip_block_mask(q, k, **kw)))(q, k)
    idx = np.asarray(idx)[0]                                                  # [H, NQ, G]
    nq, nk = -(-T // bq), -(-T // bk)
    assert idx.shape == (4, nq, 4)
    lo, hi = hip_search_range(T, bq, bk, 16, 64)
    valid = idx >= 0
    srt = np.sort(np.where(valid, idx, -1 - np.arange(4)), axis=-1)  # distinct fillers for -1
    assert np.all(np.diff(srt, axis=-1) != 0)                                 # unique
    assert np.all(~valid | ((idx >= lo[:, None]) & (idx < hi[:, None])))     # search range
    assert np.all(~valid | (idx * bk + bk - 1 < np.arange(nq)[:, None] * bq))  # strictly past
    np.testing.assert_array_equal(valid.sum(-1), np.broadcast_to(np.minimum(4, hi - lo), (4, nq)))
    causal, fixed = fixed_blocks(nq, nk, bq, bk, sink_tokens=16, window=64)
    dense = np.asarray(mask.to_dense())[0]                                    # [H, NQ, NK]
    chosen = np.any(idx[..., None] == np.arange(nk), axis=-2)
    np.testing.assert_array_equal(dense, chosen | fixed)                      # selection | fixed
    assert not np.any(dense & ~causal)                                        # no future block
    cnt, ind = np.asarray(mask.counts)[0], np.asarray(mask.indices)[0]        # [H, NQ(, MK)]
    slot = np.arange(ind.shape[-1]) < cnt[..., None]
    assert np.all(~slot[..., 1:] | (np.diff(ind, axis=-1) > 0))               # sorted, unique
    last = np.take_along_axis(ind, cnt[..., None] - 1, axis=-1)[..., 0]
    assert np.all(last * bk <= np.minimum((np.arange(nq) + 1) * bq, T) - 1)  # causal
    # static max_blocks: fixed blocks per row + the budget, far below NK
    assert mask.max_blocks <= fixed.sum(-1).max() + 4 < nk


def test_budget_edges():
    """mask_k exactly covering the longest search range selects every candidate block; mask_k
    0 keeps only the always-kept blocks (diagonal, sinks, window)."""
    T, bq, bk = 300, 16, 16
    q, k, _ = qkv(B=1, T=T, seed=5)
    lo, hi = hip_search_range(T, bq, bk, 4, 16)
    kw = dict(block_q=bq, block_k=bk, sink_tokens=4, window=16)
    full, none = jax.jit(lambda q, k: (
        hip_block_mask(q, k, mask_k=int((hi - lo).max()) * bk, **kw),
        hip_block_mask(q, k, mask_k=0, **kw)))(q, k)
    causal, fixed = fixed_blocks(19, 19, bq, bk, sink_tokens=4, window=16)
    assert none.max_blocks == fixed.sum(-1).max()
    full, none = np.asarray(full.to_dense())[0], np.asarray(none.to_dense())[0]  # [H, NQ, NK]
    np.testing.assert_array_equal(full, np.broadcast_to(causal, full.shape))
    np.testing.assert_array_equal(none, np.broadcast_to(fixed, none.shape))


def test_tree_search_finds_a_smooth_peak():
    """Keys whose match with the query peaks around one distant position: the hierarchical
    search (scoring halves by their centre keys) must keep the peak's key block."""
    T, D, bq, bk = 1024, 16, 32, 16
    u = jnp.zeros(D).at[0].set(1.0)
    t = jnp.arange(T)
    select = jax.jit(lambda q, k: hip_select(q, k, mask_k=3 * bk, block_q=bq, block_k=bk,
                                             window=64))
    for target in (100, 333, 600):
        a = 8.0 * jnp.exp(-((t - target) / 60.0) ** 2)
        k = (a[:, None] * u)[None, :, None, :] + 0.01 * jax.random.normal(
            jax.random.key(target), (1, T, 1, D))
        q = jnp.broadcast_to(u, (1, T, 1, D))
        idx = np.asarray(select(q, k))
        last = idx[0, 0, -1]
        assert target // bk in last, (target, last)


def test_topk_block_mask_keeps_best_candidates():
    """The shared helper: the top-k causal blocks outside the always-kept ones, plus those."""
    nq = nk = 10
    scores = jax.random.normal(jax.random.key(0), (1, 2, nq, nk))
    mask = jax.jit(lambda s: topk_block_mask(s, 2, block_q=8, block_k=8, q_len=80, k_len=80,
                                             window=8, sink_tokens=1))(scores)
    dense = np.asarray(mask.to_dense())[0]
    causal, fixed = fixed_blocks(nq, nk, 8, 8, window=8, sink_tokens=1)
    cand = causal & ~fixed
    s = np.where(cand, np.asarray(scores)[0], -np.inf)
    rank = np.argsort(np.argsort(-s, axis=-1), axis=-1)                       # 0 = best
    np.testing.assert_array_equal(dense, (cand & (rank < 2)) | fixed)
    assert mask.max_blocks == min(fixed.sum(-1).max() + 2, nk)
    # a selection outside the causal range is dropped
    sel = jnp.ones((1, 1, nq, nk), bool)
    full = jax.jit(lambda s: selection_block_mask(s, nk, block_q=8, block_k=8, q_len=80,
                                                  k_len=80))(sel)
    np.testing.assert_array_equal(np.asarray(full.to_dense())[0, 0], causal)


# ----------------------------------------------------------------------------- the layer
def test_full_budget_equals_dense_softmax():
    cfg = hip_cfg(hip_mask_k=4096, hip_block_q=16, hip_block_k=16, hip_window=32, hip_sink=4,
                  hip_in_train=True)
    hip, soft = layer_pair(cfg)
    B, T = 2, 200                                                             # a partial block
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def run(layer, x):
        pre = layer(x, positions=pos, cache=layer.init_cache(B, T), mode="prefill")[0]
        return pre, layer(x, positions=pos, mode="train")[0]

    (pre, train), (dense, _) = jit_apply(hip, run, x), jit_apply(soft, run, x)
    assert rel_err(pre, dense) < 1e-5
    assert rel_err(train, dense) < 1e-5                                       # hip_in_train
    q, k, _ = qkv(B=1, T=T)
    mask = jax.jit(lambda q, k: hip_block_mask(q, k, mask_k=4096, block_q=16, block_k=16,
                                               sink_tokens=4, window=32))(q, k)
    causal, _ = fixed_blocks(13, 13, 16, 16)
    assert np.all(np.asarray(mask.to_dense()) == causal)


def test_small_budget_uses_only_the_selected_blocks():
    cfg = hip_cfg(hip_mask_k=32, hip_block_q=16, hip_block_k=16, hip_window=16, hip_sink=4,
                  sparse_impl="xla")
    hip, soft = layer_pair(cfg)
    assert not hip.in_train
    B, T, H, hd = 2, 256, hip.num_heads, hip.head_dim
    q, k, v = qkv(B=B, T=T, H=H, Hk=hip.num_kv_heads, D=hd, seed=3)

    def run(layer, q, k, v, v2):
        mask = layer.block_mask(q, k)
        return (layer.attend(q, k, v, mode="prefill"), mask,
                block_sparse_attention(q, k, v, mask, causal=True, impl="reference"),
                layer.attend(q, k, v, mode="train"), layer.attend(q, k, v2, mode="prefill"))

    # values in key blocks that no head selected for the last query block do not reach its
    # outputs (the mask depends on q and k only, so it is the same for v and v2)
    mask = jax.jit(hip.block_mask)(q, k)
    dm = np.asarray(mask.to_dense())                                          # [B, H, NQ, NK]
    i = dm.shape[2] - 1
    unused = ~dm[:, :, i].any(axis=1)                                         # [B, NK]
    assert unused.sum() > 0
    tok = np.repeat(unused, 16, axis=-1)[:, :T]                               # [B, T]
    v2 = v + jnp.asarray(tok, jnp.float32)[:, :, None, None] * 100.0
    out, mask, ref, train, out2 = jit_apply(hip, run, q, k, v, v2)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert float(mask.density().max()) < 0.5 * 0.6                           # well below causal
    assert rel_err(out, ref) < 1e-5                                           # the op on the mask
    assert rel_err(out, dense) > 1e-2                                         # sparse != dense
    assert rel_err(train, dense) < 1e-5                                       # train stays dense
    np.testing.assert_allclose(out2[:, i * 16:], out[:, i * 16:], atol=1e-5)
    assert rel_err(out2, out) > 1e-2                                          # other rows see v2


def test_tiny_lm_prefill_and_generation():
    """The tiny LM with HiP loads the softmax LM's parameters unchanged; with a full budget its
    prefill logits equal the softmax LM's; with a small one prefill is sparse (logits differ)
    and generation runs."""
    check_sparse_prefill_lm(hip_cfg, dict(hip_block_q=16, hip_block_k=16, hip_window=16, hip_sink=4),
                            "hip_mask_k")
