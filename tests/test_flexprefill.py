"""FlexPrefill (attention/flexprefill.py): sqrt-JSD, the block mask (causal, first + diagonal
blocks, gamma cover, minimum budget), the head-type decision, equality with dense causal attention
at gamma = 1 / full budget, and prefill inside the tiny LM's generate."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import attention
from attention.flexprefill import (FlexPrefillAttention, flexprefill_attention, flexprefill_mask,
                                   sqrt_jsd)
from attention.ops.block_sparse import BlockMask, block_sparse_attention, causal_blocks
from attention.softmax import SoftmaxAttention
from conftest import TINY
from trainer import load_config

SQRT_LN2 = math.sqrt(math.log(2.0))
# jitted once per static configuration: far faster than running the many small ops eagerly
# (tau only enters a comparison, so it may be traced: one compilation serves every tau)
mask_fn = jax.jit(flexprefill_mask, static_argnames=("block", "gamma", "min_budget"))


def _qkv(B=2, T=61, H=4, H_kv=2, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, d)), jax.random.normal(ks[1], (B, T, H_kv, d)),
            jax.random.normal(ks[2], (B, T, H_kv, d)))


def _model_config(**fields):
    """The tiny LM's config.model (unlocked copy) with attention=flexprefill and `fields`."""
    cfg = ml_collections.ConfigDict(load_config(TINY).model.to_dict())
    cfg.attention = "flexprefill"
    for key, value in {**FlexPrefillAttention.CONFIG_DEFAULTS, **fields}.items():
        cfg[key] = value
    return cfg


# ----------------------------------------------------------------------------- sqrt(JSD)
def test_sqrt_jsd_symmetric_bounded_and_zero_on_equal():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(16, 0.3), size=256).astype(np.float32)
    q = rng.dirichlet(np.full(16, 0.3), size=256).astype(np.float32)
    d_pq, d_qp = np.asarray(sqrt_jsd(p, q)), np.asarray(sqrt_jsd(q, p))
    np.testing.assert_allclose(d_pq, d_qp, rtol=1e-6, atol=1e-7)
    assert np.all(d_pq >= 0) and np.all(d_pq <= SQRT_LN2 + 1e-6)
    assert np.all(np.isfinite(d_pq))
    np.testing.assert_allclose(sqrt_jsd(p, p), 0.0, atol=2e-3)  # sqrt amplifies f32 rounding
    # disjoint supports reach the bound sqrt(ln 2)
    a = np.zeros((3, 8), np.float32)
    b = np.zeros((3, 8), np.float32)
    a[:, :3], b[:, 3:] = 1 / 3, 1 / 5
    np.testing.assert_allclose(sqrt_jsd(a, b), SQRT_LN2, rtol=1e-5)
    # against a float64 numpy evaluation
    m = 0.5 * (p.astype(np.float64) + q)
    kl = lambda x: np.sum(np.where(x > 0, x * np.log(np.where(x > 0, x, 1) / m), 0), -1)
    np.testing.assert_allclose(d_pq, np.sqrt(0.5 * kl(p) + 0.5 * kl(q)), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])  # all vertical-slash, mixed, all query-aware
@pytest.mark.parametrize("gamma", [0.2, 0.9])
def test_mask_is_causal_keeps_first_and_diagonal_and_budget(tau, gamma):
    block, budget = 8, 24
    q, k, _ = _qkv()
    T = q.shape[1]
    mask, info = mask_fn(q, k, block=block, gamma=gamma, tau=tau, min_budget=budget)
    nb = -(-T // block)
    mask = np.asarray(mask)
    assert mask.shape == (2, 4, nb, nb) and mask.dtype == bool
    causal = np.asarray(causal_blocks(nb, nb, block, block))
    assert not np.any(mask & ~causal), "a block above the diagonal"
    assert mask[..., :, 0].all(), "first key block missing"
    assert mask[..., np.arange(nb), np.arange(nb)].all(), "diagonal block missing"
    per_row = mask.sum(-1)
    floor = np.minimum(-(-budget // block), np.arange(nb) + 1)
    assert np.all(per_row >= floor), "minimum budget not met"
    np.testing.assert_array_equal(info["query_aware"], np.asarray(info["jsd"]) < tau)
    # the same mask builds a BlockMask under jit with static max_blocks
    bm = jax.jit(lambda m: BlockMask.from_dense(m, block, block, q_len=T, k_len=T,
                                                max_blocks=nb))(jnp.asarray(mask))
    np.testing.assert_array_equal(bm.to_dense(), mask)


def test_query_aware_mask_covers_gamma_of_the_estimate():
    """tau = 1: every head query-aware; with no budget the kept pairs carry >= gamma of the
    flattened, normalised estimated block map, and the cover takes the largest pairs first."""
    q, k, _ = _qkv(seed=1)
    gamma = 0.6
    mask, info = mask_fn(q, k, block=8, gamma=gamma, tau=1.0, min_budget=0)
    assert np.all(info["query_aware"])
    nb = mask.shape[-1]
    est = np.asarray(info["estimate"]) / nb   # rows sum to 1 -> the whole map to 1
    mask = np.asarray(mask)
    causal = np.asarray(causal_blocks(nb, nb, 8, 8))
    forced = np.eye(nb, dtype=bool)
    forced[:, 0] = True
    for b in range(mask.shape[0]):
        for h in range(mask.shape[1]):
            assert est[b, h][mask[b, h]].sum() >= gamma - 1e-5
            chosen = est[b, h][mask[b, h] & ~forced]
            dropped = est[b, h][causal & ~mask[b, h]]
            if chosen.size and dropped.size:
                assert chosen.min() >= dropped.max()


def test_vertical_slash_mask_covers_gamma_of_the_vertical_profile():
    """tau = 0: every head vertical-slash; the last query block keeps key blocks carrying at
    least gamma of the last block's vertical attention profile."""
    q, k, _ = _qkv(seed=2)
    gamma = 0.5
    mask, info = mask_fn(q, k, block=8, gamma=gamma, tau=0.0, min_budget=0)
    assert not np.any(info["query_aware"])
    v = np.asarray(info["vertical"])
    np.testing.assert_allclose(v.sum(-1), 1.0, rtol=1e-5)
    assert np.all((v * np.asarray(mask)[..., -1, :]).sum(-1) >= gamma - 1e-5)


def _typed_heads(T=64, d=16, block=8):
    """Three heads with known types: 0 uniform attention (q = 0: the block average is exact up
    to the causal edge -> small D), 1 a sink on token 0 whose block-0 mean key is 0 (the block
    average misses it -> D near sqrt(ln 2)), 2 local (each query attends to itself)."""
    rng = np.random.default_rng(0)
    q = np.zeros((1, T, 3, d), np.float32)
    k = rng.normal(size=(1, T, 3, d)).astype(np.float32) * 0.1
    e = np.zeros(d, np.float32)
    e[0] = 1
    q[0, :, 1] = 8 * e
    k[0, :, 1] = 0
    k[0, 0, 1] = 8 * e
    k[0, 1:block, 1] = -8 * e / (block - 1)
    u = rng.normal(size=(T, d))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    q[0, :, 2] = k[0, :, 2] = 12 * u
    return jnp.asarray(q), jnp.asarray(k)


def test_head_type_decision_follows_tau():
    q, k = _typed_heads()
    _, info = mask_fn(q, k, block=8, gamma=0.5, tau=0.1, min_budget=0)
    D = np.asarray(info["jsd"])[0]
    assert D[0] < 0.1 and D[1] > 0.6 and 0.1 < D[2] < 0.5, D
    for tau, expect in [(0.0, [0, 0, 0]), (0.1, [1, 0, 0]), (0.5, [1, 0, 1]), (1.0, [1, 1, 1])]:
        _, info = mask_fn(q, k, block=8, gamma=0.5, tau=tau, min_budget=0)
        np.testing.assert_array_equal(np.asarray(info["query_aware"])[0], np.array(expect, bool),
                                      err_msg=f"tau={tau}")


def test_vertical_slash_heads_find_sink_and_local_patterns():
    """Sink and local heads (vertical-slash at tau 0.1) keep exactly the first column and the
    diagonal: the patterns they have; the uniform head (query-aware) keeps more."""
    q, k = _typed_heads()
    mask, info = mask_fn(q, k, block=8, gamma=0.5, tau=0.1, min_budget=0)
    nb = mask.shape[-1]
    first_and_diag = np.eye(nb, dtype=bool)
    first_and_diag[:, 0] = True
    np.testing.assert_array_equal(mask[0, 1], first_and_diag)
    np.testing.assert_array_equal(mask[0, 2], first_and_diag)
    assert bool(info["query_aware"][0, 0]) and int(mask[0, 0].sum()) > int(first_and_diag.sum())


# ----------------------------------------------------------------------------- equal to dense
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_gamma_one_equals_dense_causal(tau):
    q, k, v = _qkv()
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    f = jax.jit(lambda q, k, v: flexprefill_attention(q, k, v, block=8, gamma=1.0, tau=tau,
                                                      min_budget=8, impl="xla"))
    np.testing.assert_allclose(f(q, k, v), ref, atol=2e-5, rtol=2e-5)


def test_full_budget_mask_is_all_causal_blocks_and_equals_dense():
    q, k, v = _qkv()
    T, block = q.shape[1], 8
    nb = -(-T // block)
    mask, _ = mask_fn(q, k, block=block, gamma=0.3, tau=0.1, min_budget=T)
    np.testing.assert_array_equal(
        mask, np.broadcast_to(causal_blocks(nb, nb, block, block), mask.shape))
    bm = BlockMask.from_dense(mask, block, block, q_len=T, k_len=T, max_blocks=nb)
    o = block_sparse_attention(q, k, v, bm, causal=True, impl="xla")
    np.testing.assert_allclose(o, jax.nn.dot_product_attention(q, k, v, is_causal=True),
                               atol=2e-5, rtol=2e-5)
    # flexprefill_attention itself (short-cuts to dense when the budget covers everything)
    np.testing.assert_allclose(
        flexprefill_attention(q, k, v, block=block, gamma=0.3, min_budget=T), o,
        atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- the layer
def _layers(**fields):
    cfg = _model_config(**fields)
    with nnx.use_eager_sharding(False):
        soft = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
        flex = attention.build("flexprefill", cfg, dtype=jnp.float32, rngs=nnx.Rngs(1))
    return cfg, soft, flex


def test_layer_is_registered_and_loads_softmax_parameters():
    assert attention.get("flexprefill") is FlexPrefillAttention
    _, soft, flex = _layers()
    s_state, f_state = nnx.state(soft, nnx.Param), nnx.state(flex, nnx.Param)
    assert jax.tree.structure(s_state) == jax.tree.structure(f_state)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(s_state),
                                                   jax.tree.leaves(f_state)))
    nnx.update(flex, s_state)  # a softmax checkpoint loads as is


@pytest.mark.parametrize("gamma,equal", [(1.0, True), (0.3, False)])
def test_layer_prefill_vs_softmax(gamma, equal):
    """Prefill (prompt of 5 blocks) equals SoftmaxAttention at gamma = 1 and differs at 0.3;
    train mode stays dense unless flex_in_train."""
    cfg, soft, flex = _layers(flex_block=8, flex_gamma=gamma, flex_min_budget=8)
    nnx.update(flex, nnx.state(soft, nnx.Param))
    B, T = 2, 40
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    @nnx.jit
    def prefill(m, x, pos):
        return m(x, positions=pos, cache=m.init_cache(B, 48), mode="prefill")[0]

    y_soft, y_flex = prefill(soft, x, pos), prefill(flex, x, pos)
    assert np.all(np.isfinite(y_flex))
    if equal:
        np.testing.assert_allclose(y_flex, y_soft, atol=1e-5, rtol=1e-5)
    else:
        assert float(jnp.max(jnp.abs(y_flex - y_soft))) > 1e-6
    train = nnx.jit(lambda m, x, pos: m(x, positions=pos)[0])
    np.testing.assert_allclose(train(flex, x, pos), train(soft, x, pos), atol=1e-6, rtol=1e-6)


def test_flex_in_train_sparsifies_training_and_has_gradients():
    cfg, soft, flex = _layers(flex_block=8, flex_gamma=0.3, flex_min_budget=8, flex_in_train=True)
    nnx.update(flex, nnx.state(soft, nnx.Param))
    x = jax.random.normal(jax.random.key(4), (2, 40, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    train = nnx.jit(lambda m, x, pos: m(x, positions=pos)[0])
    assert float(jnp.max(jnp.abs(train(flex, x, pos) - train(soft, x, pos)))) > 1e-6
    grads = nnx.jit(nnx.grad(lambda m, x, pos: jnp.sum(m(x, positions=pos)[0] ** 2)))(flex, x, pos)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_tiny_lm_generate_with_flexprefill_prefill():
    """models.lm.generate with FlexPrefill layers: a 40-token prompt (5 blocks of 8) goes through
    the sparse prefill; at gamma = 1 the tokens and logits equal the softmax LM's."""
    from models.lm import LM, generate
    base = _model_config(flex_block=8, flex_min_budget=8)
    soft_cfg = ml_collections.ConfigDict(base.to_dict())
    soft_cfg.attention = "softmax"
    soft = LM(soft_cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 40), 0, 256, jnp.int32)
    ref_tokens, ref_logits = generate(soft, prompt, 4, return_logits=True)
    for gamma in (1.0, 0.5):
        cfg = ml_collections.ConfigDict(base.to_dict())
        cfg.flex_gamma = gamma
        lm = LM(cfg, rngs=nnx.Rngs(1))
        nnx.update(lm, nnx.state(soft, nnx.Param))
        tokens, logits = generate(lm, prompt, 4, return_logits=True)
        assert tokens.shape == (2, 4) and np.all(np.isfinite(logits))
        if gamma == 1.0:
            np.testing.assert_array_equal(tokens, ref_tokens)
            np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
