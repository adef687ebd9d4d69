"""ComplexFormer CMHA (attention/complexformer.py): delta = 1, b = 0 is RoPE attention; the
factorised (rotated-feature) score equals the paper's per-(m, n, j) cosine sum, with gradients
w.r.t. delta and b; causal; decode == full recompute; T = 2048 runs on CPU."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention.complexformer import (ComplexFormerAttention, cmha_scores_reference,
                                     complex_features)
from attention.ops.rope import apply_rope
from conftest import assert_decode_matches_recompute
from attention.softmax import SoftmaxAttention


def _randn(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(**kw):
    base = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=0, num_layers=2,
                rope_theta=10000.0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _layer(cls, cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return cls(cfg, rngs=nnx.Rngs(seed))


def _positions(B, T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _factorised_scores(q, k, delta, bias, theta=10000.0):
    pos = _positions(q.shape[0], q.shape[1])
    qt = complex_features(q, pos, delta, bias, theta=theta)
    kt = complex_features(k, _positions(k.shape[0], k.shape[1]), delta, theta=theta)
    return jnp.einsum("bthd,bshd->bhts", qt, kt)


def test_delta_1_b_0_is_rope():
    """Scores with delta = 1, b = 0 == RoPE(q) . RoPE(k) (attention/ops/rope.py's half-split
    layout: real parts first), and the layer == the softmax layer with the same projections."""
    B, T, H, d = 2, 9, 3, 8
    q, k = _randn((B, T, H, d), 1), _randn((B, T, H, d), 2)
    ones, zeros = jnp.ones((H, d // 2)), jnp.zeros((H, d // 2))
    pos = _positions(B, T)
    rope = jnp.einsum("bthd,bshd->bhts", apply_rope(q, pos), apply_rope(k, pos))
    np.testing.assert_allclose(_factorised_scores(q, k, ones, zeros), rope, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cmha_scores_reference(q, k, ones, zeros), rope, atol=1e-5,
                               rtol=1e-5)

    c, s = _layer(ComplexFormerAttention, _cfg()), _layer(SoftmaxAttention, _cfg())
    assert attention.get("complexformer") is ComplexFormerAttention
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # a softmax checkpoint loads
        np.testing.assert_array_equal(getattr(c, name).kernel[...], getattr(s, name).kernel[...])
    x = _randn((2, 11, 32), 3)
    pos = _positions(2, 11)
    np.testing.assert_allclose(c(x, positions=pos)[0], s(x, positions=pos)[0], atol=1e-5,
                               rtol=1e-4)


def test_factorised_equals_naive_reference_with_gradients():
    """Awkward shapes (T = 7, d_h = 6), random delta and b: scores and the gradients of a
    function of them w.r.t. delta, b, q and k equal the per-(m, n, j) cosine sum."""
    B, T, H, d = 2, 7, 2, 6
    q, k = _randn((B, T, H, d), 4), _randn((B, T, H, d), 5)
    delta = 1.0 + _randn((H, d // 2), 6, 0.5)
    bias = _randn((H, d // 2), 7, 0.5)
    w = _randn((B, H, T, T), 8)

    def f(fn):
        return lambda q, k, delta, bias: jnp.sum(w * jnp.tanh(fn(q, k, delta, bias) / 3))

    fast = _factorised_scores(q, k, delta, bias)
    ref = cmha_scores_reference(q, k, delta, bias)
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=1e-5)
    g_fast = jax.grad(f(_factorised_scores), argnums=(0, 1, 2, 3))(q, k, delta, bias)
    g_ref = jax.grad(f(cmha_scores_reference), argnums=(0, 1, 2, 3))(q, k, delta, bias)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
        assert np.abs(np.asarray(b)).max() > 0


def test_layer_is_softmax_of_reference_scores_and_causal():
    """The layer's output == softmax(s / sqrt(d_h) + causal mask) V with the reference scores
    (non-trivial delta, b; GQA 4 query / 2 kv heads); changing a later token leaves earlier
    outputs unchanged; model.causal=False gives the unmasked softmax."""
    for causal in (True, False):
        cfg = _cfg(causal=causal, d_model=24)  # head_dim 6
        layer = _layer(ComplexFormerAttention, cfg)
        layer.delta[...] = 1.0 + _randn(layer.delta.shape, 9, 0.5)
        layer.phase_bias[...] = _randn(layer.phase_bias.shape, 10, 0.5)
        B, T, H, hd = 2, 7, 4, 6
        x = _randn((B, T, 24), 11)
        pos = _positions(B, T)
        y = layer(x, positions=pos)[0]
        q = layer.q_proj(x).reshape(B, T, H, hd)
        k = jnp.repeat(layer.k_proj(x).reshape(B, T, 2, hd), 2, axis=2)
        v = jnp.repeat(layer.v_proj(x).reshape(B, T, 2, hd), 2, axis=2)
        s = cmha_scores_reference(q, k, layer.delta[...], layer.phase_bias[...]) / np.sqrt(hd)
        if causal:
            s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v)
        np.testing.assert_allclose(y, layer.o_proj(ref.reshape(B, T, H * hd)), atol=1e-5,
                                   rtol=1e-5)
        x2 = x.at[:, 4:].add(_randn((B, T - 4, 24), 12))
        y2 = layer(x2, positions=pos)[0]
        diff = np.abs(np.asarray(y2 - y))
        if causal:
            np.testing.assert_array_equal(diff[:, :4], 0)
        else:
            assert diff[:, :4].max() > 1e-6


def test_decode_equals_full_recompute():
    cfg = _cfg()
    layer = _layer(ComplexFormerAttention, cfg)
    layer.delta[...] = 1.0 + _randn(layer.delta.shape, 13, 0.3)
    layer.phase_bias[...] = _randn(layer.phase_bias.shape, 14, 0.3)
    assert_decode_matches_recompute(layer, _randn((2, 10, 32), 15), 4)


def test_zero_vectors_have_finite_gradients():
    q = jnp.zeros((1, 3, 1, 4)).at[0, 1].set(1.0)
    delta, bias = jnp.ones((1, 2)), jnp.zeros((1, 2))
    g = jax.grad(lambda q, d: jnp.sum(_factorised_scores(q, q, d, bias)), argnums=(0, 1))(q, delta)
    assert all(np.isfinite(np.asarray(a)).all() for a in g)


def test_long_sequence_forward_and_grad_on_cpu():
    """T = 2048 (B = 1, H = 2, d_h = 8): no [T, T, d/2] tensor; the causal scores go through
    causal_attention in query blocks of 256 rows; forward and a gradient w.r.t. delta and b run."""
    cfg = _cfg(d_model=16, num_heads=2, num_kv_heads=2, softmax_block=256)
    layer = _layer(ComplexFormerAttention, cfg)
    graphdef, params = nnx.split(layer, nnx.Param)
    x = _randn((1, 2048, 16), 16)
    pos = _positions(1, 2048)

    @jax.jit
    def loss(params):
        y = nnx.merge(graphdef, params)(x, positions=pos)[0]
        return jnp.mean(y ** 2)

    val, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(val))
    for name in ("delta", "phase_bias"):
        g = np.asarray(grads[name][...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_odd_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim"):
        _layer(ComplexFormerAttention, _cfg(head_dim=5))
