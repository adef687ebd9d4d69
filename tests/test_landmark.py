"""Landmark attention (attention/landmark.py): the grouped softmax, its reduction to causal
softmax without earlier blocks, top-k retrieval at prefill (grouped: equals training with all
blocks; standard: equals dense softmax with all blocks; top-k < all: the restricted formulas), and
the layer inside the tiny LM (finite grads, KV-cached generation)."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from attention import registry
from attention.landmark import (LandmarkAttention, grouped_softmax_attention,
                                landmark_retrieval_attention, retrieval_decode_attention,
                                select_blocks)
from attention.softmax import SoftmaxAttention
from conftest import TINY
from models.lm import LM, generate
from trainer import load_config


def _rand(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _layer_cfg(**kw):
    base = dict(num_heads=4, num_kv_heads=2, head_dim=8, d_model=16, num_layers=1,
                rope_theta=10000.0, landmark_every=4, landmark_top_k=5)
    return ml_collections.ConfigDict({**base, **kw})


def _layers(**kw):
    """A LandmarkAttention with random (non-zero) landmark parameters and a SoftmaxAttention with
    the same q/k/v/o projections."""
    cfg = _layer_cfg(**kw)
    with nnx.use_eager_sharding(False):
        lm = LandmarkAttention(cfg, rngs=nnx.Rngs(0))
        sm = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
    lm.landmark_pool[...] = _rand(5, *lm.landmark_pool.shape)
    lm.landmark_embed[...] = _rand(6, *lm.landmark_embed.shape)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(getattr(lm, name).kernel[...], getattr(sm, name).kernel[...])
    return lm, sm


@nnx.jit(static_argnames="mode")
def _run(layer, x, mode):
    B, T, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = None if mode == "train" else layer.init_cache(B, T)
    return layer(x, positions=pos, cache=cache, mode=mode)[0]


# ----------------------------------------------------------------------------- grouped softmax
def _grouped_weights_loop(q, k, s_land, block):
    """The paper's AttWeight (Sec. 3.1), written per query with explicit groups. [H, T, S]."""
    T, H, d = q.shape[1:]
    rep = H // k.shape[2]
    w = np.zeros((H, T, T))
    for h, i in itertools.product(range(H), range(T)):
        s = [float(q[0, i, h] @ k[0, j, h // rep]) / np.sqrt(d) for j in range(T)]
        c = i // block
        # outer group: landmarks of blocks b < c, current-block tokens j <= i
        outer = [s_land[0, h, i, b] for b in range(c)] + [s[j] for j in range(c * block, i + 1)]
        p_out = np.exp(np.array(outer) - max(outer))
        p_out /= p_out.sum()
        for j in range(c * block, i + 1):
            w[h, i, j] = p_out[c + j - c * block]
        for b in range(c):  # inner groups
            inner = np.exp(np.array(s[b * block:(b + 1) * block]))
            w[h, i, b * block:(b + 1) * block] = inner / inner.sum() * p_out[b]
    return w


def test_grouped_softmax_matches_the_paper_and_rows_sum_to_one():
    T, block = 11, 3  # 3 complete blocks and a partial one
    q, k, v = _rand(1, 1, T, 4, 6), _rand(2, 1, T, 2, 6), _rand(3, 1, T, 2, 6)
    s_land = 2 * _rand(4, 1, 4, T, 4)
    y, w = grouped_softmax_attention(q, k, v, s_land, block=block, return_weights=True)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)  # landmarks hold no weight
    assert float(jnp.max(jnp.abs(jnp.triu(w[0], 1)))) == 0.0  # causal
    np.testing.assert_allclose(w[0], _grouped_weights_loop(np.asarray(q), np.asarray(k),
                                                            np.asarray(s_land), block), atol=1e-6)
    np.testing.assert_allclose(y, jnp.einsum("bhts,bshd->bthd", w, jnp.repeat(v, 2, 2)), atol=1e-5)
    # earlier block b receives exactly the landmark's outer probability: raising s_L(i, 0) for a
    # query of block 2 moves mass to block 0 (the gate)
    w2 = grouped_softmax_attention(q, k, v, s_land.at[..., 0].add(3.0), block=block,
                                   return_weights=True)[1]
    i = 7
    assert float(w2[0, 0, i, :3].sum()) > float(w[0, 0, i, :3].sum()) + 0.05


@pytest.mark.parametrize("T", [5, 8])
def test_without_an_earlier_block_equals_causal_softmax(T):
    """T <= l: no landmark is visible, train and prefill equal SoftmaxAttention."""
    lm, sm = _layers(landmark_every=8)
    x = _rand(7, 2, T, 16)
    ref = _run(sm, x, "train")
    np.testing.assert_allclose(_run(lm, x, "train"), ref, atol=1e-6)
    np.testing.assert_allclose(_run(lm, x, "prefill"), ref, atol=1e-6)


# ----------------------------------------------------------------------------- retrieval
# T=19, l=4: 4 earlier blocks at most, so top_k=4 retrieves every block
@pytest.mark.parametrize("top_k,impl", [(4, "xla"), (100, "reference")])
def test_prefill_all_blocks_grouped_equals_training(top_k, impl):
    lm, sm = _layers(landmark_top_k=top_k, landmark_impl=impl)
    x = _rand(8, 2, 19, 16)
    train = _run(lm, x, "train")
    np.testing.assert_allclose(_run(lm, x, "prefill"), train, atol=1e-5)
    # not vacuous: the grouped softmax is not plain causal softmax here
    assert float(jnp.max(jnp.abs(train - _run(sm, x, "train")))) > 1e-3


def test_prefill_all_blocks_standard_equals_dense_softmax():
    """The paper's inference formula (standard softmax over retrieved + local tokens): with every
    block retrieved it is dense causal softmax, not the grouped softmax."""
    lm, sm = _layers(landmark_top_k=100, landmark_inference="standard")
    x = _rand(9, 2, 19, 16)
    np.testing.assert_allclose(_run(lm, x, "prefill"), _run(sm, x, "train"), atol=1e-5)


def _selection_reference(s_land, block, top_k):
    """Per query block n: the top-k earlier blocks by max over the block's queries (numpy)."""
    s = np.asarray(s_land)
    B, H, T, _ = s.shape
    nq = -(-T // block)
    keep = np.zeros((B, H, nq, nq), bool)
    for b, h, n in itertools.product(range(B), range(H), range(nq)):
        score = s[b, h, n * block:(n + 1) * block, :n].max(0) if n else np.zeros(0)
        keep[b, h, n, np.argsort(-score, kind="stable")[:top_k]] = True
    return keep


@pytest.mark.parametrize("top_k", [1, 2])
def test_prefill_top_k_equals_the_restricted_formulas(top_k):
    """top-k < all: grouped = the grouped softmax with only the selected blocks' landmarks;
    standard = causal softmax over the selected blocks' tokens and the current block."""
    T, block = 22, 4
    q, k, v = _rand(11, 2, T, 4, 8), _rand(12, 2, T, 2, 8), _rand(13, 2, T, 2, 8)
    s_land = 2 * _rand(14, 2, 4, T, 6)
    keep = _selection_reference(s_land, block, top_k)                      # [B, H, NQ, NQ]
    idx, valid = jax.jit(select_blocks, static_argnums=(1, 2, 3))(s_land, block, T, top_k)
    got = np.zeros_like(keep)
    for b, h, n, s in np.argwhere(np.asarray(valid)):
        got[b, h, n, idx[b, h, n, s]] = True
    np.testing.assert_array_equal(got, keep)
    qb = np.arange(T) // block
    tok_keep = keep[:, :, qb, :]                                            # [B, H, T, NQ]

    retrieve = jax.jit(landmark_retrieval_attention,
                       static_argnames=("block", "top_k", "formula", "impl"))
    dense = jax.jit(grouped_softmax_attention, static_argnames=("block", "return_weights"))
    grouped = retrieve(q, k, v, s_land, block=block, top_k=top_k)
    ref = dense(q, k, v, jnp.where(tok_keep, s_land, -jnp.inf), block=block)
    np.testing.assert_allclose(grouped, ref, atol=1e-5)
    full = dense(q, k, v, s_land, block=block)
    assert float(jnp.max(jnp.abs(grouped - full))) > 1e-3  # blocks were really dropped

    standard = retrieve(q, k, v, s_land, block=block, top_k=top_k, formula="standard")
    allowed = np.repeat(tok_keep, block, -1)[..., :T] | (qb[:, None] == qb[None, :])
    allowed &= np.tril(np.ones((T, T), bool))
    s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, 2)) / np.sqrt(8)
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), -1)
    np.testing.assert_allclose(standard, jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, 2, 2)),
                               atol=1e-5)


@pytest.mark.parametrize("pos,top_k", [(17, 2), (9, 3), (2, 1), (23, 6)])
def test_decode_top_k_equals_the_restricted_grouped_softmax(pos, top_k):
    """One decoding step gathering only the top-k blocks == the dense grouped softmax over the
    cache with only those blocks' landmarks (keys after pos are garbage and must be ignored)."""
    block, S = 4, 24
    q, kc, vc = _rand(21, 2, 1, 4, 8), _rand(22, 2, S, 2, 8), _rand(23, 2, S, 2, 8)
    s_land = 2 * _rand(24, 2, 4, 1, S // block)
    c = pos // block
    keep = np.zeros(s_land.shape, bool)
    for b, h in itertools.product(range(2), range(4)):
        keep[b, h, 0, np.argsort(-np.asarray(s_land[b, h, 0, :c]))[:top_k]] = True
    got = jax.jit(retrieval_decode_attention, static_argnames=("block", "top_k"))(
        q, kc, vc, s_land, pos, block=block, top_k=top_k)
    ref = grouped_softmax_attention(q, kc, vc, jnp.where(keep, s_land, -jnp.inf), block=block,
                                    q_pos=jnp.array([pos]))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if 0 < top_k < c:  # not vacuous: some block was dropped
        full = grouped_softmax_attention(q, kc, vc, s_land, block=block, q_pos=jnp.array([pos]))
        assert float(jnp.max(jnp.abs(got - full))) > 1e-3


# ----------------------------------------------------------------------------- in the LM
def _lm_config(**fields):
    cfg = load_config(TINY, ["model.attention=landmark"]).model
    assert registry.get("landmark") is LandmarkAttention
    with cfg.unlocked():
        for key, value in {**LandmarkAttention.CONFIG_DEFAULTS, **fields}.items():
            cfg[key] = value
    return cfg


def test_tiny_lm_trains_with_finite_grads():
    cfg = _lm_config(landmark_every=8, num_layers=1)
    model = LM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, 256, jnp.int32)

    def loss_fn(model):
        logits, _ = model(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    loss, grads = jax.jit(nnx.value_and_grad(loss_fn))(model)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(grads, nnx.Param))[0]
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in leaves)
    # the landmark parameters learn (T=32, l=8: earlier blocks exist)
    lp = [np.asarray(g) for p, g in leaves if "landmark" in jax.tree_util.keystr(p)]
    assert len(lp) == 2 * cfg.num_layers and all(np.abs(g).max() > 0 for g in lp)


@pytest.mark.parametrize("decode", ["dense", "topk"])
def test_generate_equals_full_recompute(decode):
    """Prompt 6 + 10 new tokens, l=4 (4 blocks), top_k=5 >= all blocks: prefill (grouped) and
    decoding ("dense", and "topk" keeping every block) equal the train-mode forward."""
    cfg = _lm_config(landmark_every=4, landmark_top_k=5, landmark_decode=decode)
    model = LM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 6), 0, 256, jnp.int32)
    new = 10
    tokens, logits = generate(model, prompt, new, return_logits=True)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    seq = jnp.concatenate([prompt, tokens], 1)
    full = forward(state, seq)[:, prompt.shape[1] - 1:-1]
    np.testing.assert_array_equal(tokens, jnp.argmax(full, -1))
    np.testing.assert_allclose(logits, full, atol=1e-4, rtol=1e-4)


def test_generate_with_retrieval_runs():
    """top_k = 1 on a longer prompt: prefill and "topk" decoding drop blocks, outputs finite and
    different from the full recompute (retrieval is active)."""
    cfg = _lm_config(landmark_every=4, landmark_top_k=1, landmark_decode="topk", num_layers=1)
    model = LM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(2), (2, 17), 0, 256, jnp.int32)
    tokens, logits = generate(model, prompt, 6, return_logits=True)
    assert tokens.shape == (2, 6) and np.all(np.isfinite(np.asarray(logits)))
    full = nnx.jit(lambda m, t: m(t)[0])(model, jnp.concatenate([prompt, tokens], 1))
    assert float(jnp.max(jnp.abs(logits - full[:, 16:-1]))) > 1e-4
