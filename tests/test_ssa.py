"""SSA (attention/ssa.py): keep ratio 1 is dense; each query block keeps the pinned number of key
blocks (diagonal and first always, nothing acausal) at the requested rate; near blocks are kept
more often than far ones; draws change between training calls; eval is deterministic; the layer
trains inside the LM."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention.softmax import SoftmaxAttention
from attention.ssa import SSAAttention, kept_block_counts, sample_block_mask


def _randn(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(**kw):
    base = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=0, num_layers=2,
                rope_theta=10000.0, ssa_block_size=8, ssa_impl="xla")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _layer(cls, cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return cls(cfg, rngs=nnx.Rngs(seed))


def _fwd(B, T):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return nnx.jit(lambda m, x: m(x, positions=pos)[0])


_masks = jax.jit(jax.vmap(lambda key: sample_block_mask(
    key, 1, 1, 128, 8, keep_ratio=0.25, locality=0.5).to_dense()[0, 0]))


@pytest.fixture(scope="module")
def draws():
    """400 independent masks, T = 128 in 16 blocks of 8, keep ratio 0.25: bool [400, 16, 16]."""
    return np.asarray(_masks(jax.random.split(jax.random.key(0), 400)))


def test_registered_and_loads_softmax_params():
    assert attention.get("ssa") is SSAAttention
    r, s = _layer(SSAAttention, _cfg()), _layer(SoftmaxAttention, _cfg())
    rp, sp = nnx.state(r, nnx.Param), nnx.state(s, nnx.Param)
    assert jax.tree.structure(rp) == jax.tree.structure(sp)
    for a, b in zip(jax.tree.leaves(rp), jax.tree.leaves(sp)):
        np.testing.assert_array_equal(a, b)


def test_keep_ratio_1_equals_dense():
    B, T = 2, 37  # 5 blocks of 8, the last partial
    r = _layer(SSAAttention, _cfg(ssa_keep_ratio=1.0))
    s = _layer(SoftmaxAttention, _cfg())
    x = _randn((B, T, 32), 1)
    fwd = _fwd(B, T)
    np.testing.assert_allclose(fwd(r, x), fwd(s, x), rtol=1e-5, atol=1e-6)
    assert int(r.rngs.count[...]) == 1  # it did take the sampled (training) path


def test_kept_blocks_per_query_block_match_the_rate(draws):
    n = draws.shape[-1]
    counts = kept_block_counts(n, 0.25, True)
    np.testing.assert_array_equal(counts, np.clip(np.floor(0.25 * np.arange(1, n + 1) + 0.5),
                                                  [1] + [2] * (n - 1), np.arange(1, n + 1)))
    # exactly n_i kept blocks in every row of every draw; the diagonal and block 0 always;
    # never a block above the diagonal
    np.testing.assert_array_equal(draws.sum(-1), np.broadcast_to(counts, draws.shape[:2]))
    assert draws[:, np.arange(n), np.arange(n)].all() and draws[:, :, 0].all()
    assert not (draws & ~np.tril(np.ones((n, n), bool))).any()
    # the rate: where the forced blocks do not exceed it (r (i + 1) >= 2), row i keeps a fraction
    # r of its i + 1 causal blocks up to rounding; those rows vary between draws
    rows = np.arange(7, n)
    kept = draws[:, rows].sum(-1) / (rows + 1)
    assert np.all(np.abs(kept - 0.25) <= 0.5 / (rows + 1) + 1e-9)
    assert draws[:, -1].std(0).max() > 0.3


def test_near_blocks_are_kept_more_often_than_far_ones(draws):
    freq = draws.mean(0)  # [16, 16] keep frequency per (query block, key block)
    i = 15
    random_part = freq[i, 1:i]  # blocks 1..14 of the last query block (0 and 15 are forced)
    assert np.all(np.diff(random_part) > -0.05)  # non-decreasing towards the diagonal (noise)
    assert random_part[-1] > 0.5 and random_part[-1] > 10 * random_part[:4].mean()
    # locality 0: uniform over the non-forced causal blocks
    uni = np.asarray(jax.jit(jax.vmap(lambda key: sample_block_mask(
        key, 1, 1, 128, 8, keep_ratio=0.25, locality=0.0).to_dense()[0, 0, i]))(
        jax.random.split(jax.random.key(1), 400)))
    np.testing.assert_allclose(uni.mean(0)[1:i], 2 / 14, atol=0.06)


def test_training_draws_change_and_dropped_keys_are_excluded():
    B, T = 1, 128  # 16 blocks: rows 9.. keep 3-4 blocks, 2 of them forced
    layer = _layer(SSAAttention, _cfg())
    x = _randn((B, T, 32), 2)
    fwd = _fwd(B, T)
    y1, y2 = fwd(layer, x), fwd(layer, x)
    assert int(layer.rngs.count[...]) == 2
    assert not np.allclose(y1, y2)  # a fresh mask each training call
    dense = fwd(_layer(SoftmaxAttention, _cfg()), x)
    # blocks 0 and 1 see all their causal blocks (forced: diagonal, block 0); later ones do not
    np.testing.assert_allclose(y1[:, :16], dense[:, :16], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y1[:, 16:], dense[:, 16:])
    # excluded, not masked: the op gathers only the kept blocks (static width 4 of 16), and
    # values in a dropped block do not reach the query block
    key = jax.random.key(5)
    draw = lambda key: sample_block_mask(key, B, 4, T, 8, keep_ratio=0.25, locality=0.5)
    assert jax.eval_shape(draw, key).max_blocks == 4
    q, k, v = _randn((B, T, 4, 8), 6), _randn((B, T, 2, 8), 7), _randn((B, T, 2, 8), 8)
    sampled = jax.jit(lambda v: (draw(key).to_dense(), layer._sampled(q, k, v, key)))
    dense_mask, y = sampled(v)
    dropped = ~np.asarray(dense_mask)[0, :, 15, :15].any(0)  # dropped by every head
    j = int(np.flatnonzero(dropped)[0])
    _, y2 = sampled(v.at[:, 8 * j:8 * j + 8].add(10.0))
    np.testing.assert_array_equal(y[:, 120:], y2[:, 120:])
    assert not np.allclose(y[:, 8 * j:8 * j + 8], y2[:, 8 * j:8 * j + 8])


def test_eval_is_deterministic_dense_and_ensemble_is_deterministic():
    B, T = 1, 64
    x = _randn((B, T, 32), 3)
    fwd = _fwd(B, T)
    dense = fwd(_layer(SoftmaxAttention, _cfg()), x)
    layer = _layer(SSAAttention, _cfg())
    layer.eval()
    assert layer.deterministic
    np.testing.assert_array_equal(fwd(layer, x), fwd(layer, x))
    np.testing.assert_allclose(fwd(layer, x), dense, rtol=1e-5, atol=1e-6)
    ens = _layer(SSAAttention, _cfg(ssa_ensemble=3))
    ens.eval()
    y1, y2 = fwd(ens, x), fwd(ens, x)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, dense)
    assert int(ens.rngs.count[...]) == 0


def test_trains_in_the_lm(monkeypatch):
    """Tiny LM with model.attention=ssa (blocks of 8 so that T = 32 is subsampled): a jitted
    forward/backward gives finite, non-zero grads and advances the layer's RNG stream."""
    from conftest import make_tiny_config
    from models.lm import LM, LMTask

    monkeypatch.setitem(SSAAttention.CONFIG_DEFAULTS, "ssa_block_size", 8)
    cfg = make_tiny_config("model.attention=ssa")
    with nnx.use_eager_sharding(False):
        model = LM(cfg.model, rngs=nnx.Rngs(0))
    attn = model.blocks[0].attn
    assert isinstance(attn, SSAAttention) and attn.block_size == 8
    task = LMTask(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 33)), jnp.int32)

    @nnx.jit
    def step(model, tokens):
        return nnx.value_and_grad(lambda m: task.loss(m, {"tokens": tokens})[0])(model)

    loss, grads = step(model, tokens)
    assert np.isfinite(loss)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert float(jnp.abs(grads["blocks"][0]["attn"]["k_proj"]["kernel"][...]).max()) > 0
    assert int(attn.rngs.count[...]) == 1


@pytest.mark.slow
def test_trainer_steps_advance_the_stream(tmp_path, monkeypatch):
    """Through trainer.Trainer: each train step draws a new mask (the RNG count advances in the
    train state) and trains; eval runs dense."""
    from conftest import make_tiny_config
    from trainer import Trainer

    monkeypatch.setitem(SSAAttention.CONFIG_DEFAULTS, "ssa_block_size", 8)
    config = make_tiny_config("model.attention=ssa", "train.steps=2")
    with Trainer(config, str(tmp_path), quiet=True) as t:
        c0 = int(t.model.blocks[0].attn.rngs.count[...])
        t.fit()
        c1 = int(t.model.blocks[0].attn.rngs.count[...])
    assert c1 == c0 + 2
