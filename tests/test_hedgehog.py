"""Hedgehog linear attention: linear form == masked quadratic form, Â is a causal row-stochastic
matrix, the distillation loss is a cross-entropy bounded below by the teacher's entropy, and the
layer (train / distill / prefill + decode) behaves as its softmax counterpart where it should."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention.hedgehog import (HedgehogAttention, HedgehogFeatureMap, distillation_loss,
                                hedgehog_linear_attention, hedgehog_quadratic_attention,
                                softmax_attention_weights)
from attention.softmax import SoftmaxAttention

# jitted: one compile per shape is much cheaper on CPU than op-by-op dispatch of the chunked form
hedgehog_linear_attention = jax.jit(hedgehog_linear_attention,
                                    static_argnames=("output_final_state", "chunk_size", "impl"))
hedgehog_quadratic_attention = jax.jit(hedgehog_quadratic_attention, static_argnames="causal")


def _randn(shape, seed):
    """Test data from numpy (jax.random compiles a kernel per shape: seconds on a busy CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(**kw):
    base = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=0, num_layers=2,
                rope_theta=10000.0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _feature_map(H, d, f=None, *, seed=0, noise=0.5):
    """A feature map moved away from its identity init, so each head and feature differs."""
    with nnx.use_eager_sharding(False):
        fm = HedgehogFeatureMap(H, d, f)
    fm.w[...] = fm.w[...] + noise * _randn(fm.w.shape, seed)
    fm.b[...] = noise * _randn(fm.b.shape, seed + 100)
    return fm


def _perturb_feature_maps(layer, seed=0):
    for i, fm in enumerate((layer.feature_map_q, layer.feature_map_k)):
        fm.w[...] = fm.w[...] + 0.5 * _randn(fm.w.shape, seed + i)
        fm.b[...] = 0.5 * _randn(fm.b.shape, seed + i + 100)


def _layer(cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return HedgehogAttention(cfg, rngs=nnx.Rngs(seed))


def _phis(B, T, H, d, dv, seed=0):
    q, k, v = (_randn(s, seed + i) for i, s in enumerate([(B, T, H, d), (B, T, H, d), (B, T, H, dv)]))
    return _feature_map(H, d, seed=seed + 1)(q), _feature_map(H, d, seed=seed + 2)(k), v


# ----------------------------------------------------------------------------- feature map
def test_feature_map_identity_init_and_shape():
    B, T, H, d = 2, 5, 3, 6
    x = _randn((B, T, H, d), 0)
    with nnx.use_eager_sharding(False):
        phi = HedgehogFeatureMap(H, d)(x)
        phi_wide = HedgehogFeatureMap(H, d, 10)(x)
    assert phi.shape == (B, T, H, 2 * d) and phi_wide.shape == (B, T, H, 20)
    # identity init: phi(x) = [softmax(x), softmax(-x)] exactly
    want = jnp.concatenate([jax.nn.softmax(x, -1), jax.nn.softmax(-x, -1)], -1)
    np.testing.assert_allclose(phi, want, rtol=1e-6, atol=1e-7)
    # each half is a distribution: every feature row sums to 2
    np.testing.assert_allclose(phi.sum(-1), 2.0, rtol=1e-6)


# ----------------------------------------------------------------------------- functional forms
@pytest.mark.parametrize("T", [37, 130])
def test_linear_equals_quadratic(T):
    B, H, d, dv = 2, 3, 8, 5
    phi_q, phi_k, v = _phis(B, T, H, d, dv, seed=T)
    y_lin, state = hedgehog_linear_attention(phi_q, phi_k, v, output_final_state=True)
    y_quad, _ = hedgehog_quadratic_attention(phi_q, phi_k, v)
    assert y_lin.shape == (B, T, H, dv) and y_lin.dtype == jnp.float32
    np.testing.assert_allclose(y_lin, y_quad, rtol=1e-5, atol=1e-5)
    # the final state is (S_T, z_T) = (sum phi_k^T v, sum phi_k)
    np.testing.assert_allclose(state["S"], jnp.einsum("bthf,bthv->bhfv", phi_k, v), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(state["z"], phi_k.sum(1), rtol=1e-5, atol=1e-4)


def test_linear_with_state_continues_the_sequence():
    """Two calls chained through the state == one call (the prefill/decode mechanism)."""
    B, T, H, d, dv = 1, 40, 2, 4, 3
    phi_q, phi_k, v = _phis(B, T, H, d, dv, seed=7)
    y_full, _ = hedgehog_linear_attention(phi_q, phi_k, v)
    y1, s = hedgehog_linear_attention(phi_q[:, :23], phi_k[:, :23], v[:, :23], output_final_state=True)
    y2, _ = hedgehog_linear_attention(phi_q[:, 23:], phi_k[:, 23:], v[:, 23:], initial_state=s)
    y3, _ = hedgehog_linear_attention(phi_q[:, 23:24], phi_k[:, 23:24], v[:, 23:24],
                                      initial_state=s)  # the one-step path
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y3, y_full[:, 23:24], rtol=1e-5, atol=1e-5)


def test_a_hat_rows_sum_to_one_and_causal():
    B, T, H = 2, 19, 3
    phi_q, phi_k, v = _phis(B, T, H, 6, 4, seed=3)
    y, a_hat = hedgehog_quadratic_attention(phi_q, phi_k, v)
    assert a_hat.shape == (B, H, T, T)
    np.testing.assert_allclose(a_hat.sum(-1), 1.0, rtol=1e-6)
    upper = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(np.asarray(a_hat)[..., upper] == 0.0)
    assert np.all(np.asarray(a_hat)[..., ~upper] > 0.0)
    # causal: changing the future does not change the past
    y2, _ = hedgehog_quadratic_attention(phi_q, phi_k.at[:, 10:].mul(3.0), v.at[:, 10:].add(1.0))
    np.testing.assert_allclose(y2[:, :10], y[:, :10], rtol=1e-6)
    assert not np.allclose(y2[:, 10:], y[:, 10:])


# ----------------------------------------------------------------------------- distillation
def _entropy(a):
    return -jnp.mean(jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0), -1))


def test_distillation_loss_bounds():
    B, T, H, d = 2, 24, 3, 8
    q, k = 2.0 * _randn((B, T, H, d), 11), 2.0 * _randn((B, T, H, d), 12)
    a = softmax_attention_weights(q, k)
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)
    h = float(_entropy(a))
    assert h > 0.1
    # equality when Â == A
    np.testing.assert_allclose(float(distillation_loss(a, a)), h, atol=1e-5)
    # strictly larger for Hedgehog's Â (and for other causal row-stochastic matrices)
    phi_q, phi_k, v = _phis(B, T, H, d, 4, seed=5)
    _, a_hat = hedgehog_quadratic_attention(phi_q, phi_k, v)
    uniform = jnp.broadcast_to(jnp.tril(jnp.ones((T, T))) / jnp.arange(1, T + 1)[:, None], a.shape)
    for other in (a_hat, uniform, softmax_attention_weights(q, 0.5 * k)):
        assert float(distillation_loss(a, other)) > h + 1e-3
    # the cross-entropy of the teacher's rows against the student's, -mean_i sum_{j<=i} A log Â
    an, sn = np.asarray(a, np.float64), np.asarray(a_hat, np.float64)
    tril = np.tril(np.ones((T, T), bool))
    want = -np.mean(np.sum(np.where(tril, an * np.log(np.where(tril, sn, 1.0)), 0.0), -1))
    np.testing.assert_allclose(float(distillation_loss(a, a_hat)), want, rtol=1e-5)
    # numerically safe: a zero where the teacher has mass gives a large but finite loss
    hard = jnp.broadcast_to(jnp.eye(T), a.shape)
    assert np.isfinite(float(distillation_loss(a, hard)))
    g = jax.grad(lambda s: distillation_loss(a, s))(a_hat)
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- the layer
def _x(B, T, D, seed=0):
    return _randn((B, T, D), seed)


def _positions(B, T, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))


def test_registered_and_shapes():
    assert attention.get("hedgehog") is HedgehogAttention
    cfg = _cfg()
    layer = _layer(cfg)
    B, T = 2, 13
    y, cache = _call(layer, _x(B, T, cfg.d_model), _positions(B, T))
    assert y.shape == (B, T, cfg.d_model) and cache is None and np.all(np.isfinite(y))
    c = layer.init_cache(B, 64)
    assert c["S"].shape == (B, cfg.num_heads, 2 * 8, 8) and c["z"].shape == (B, cfg.num_heads, 16)
    assert c["S"].dtype == jnp.float32
    # projections match SoftmaxAttention's (checkpoint transfer), plus the two feature maps
    with nnx.use_eager_sharding(False):
        sm = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        a, b = getattr(layer, name).kernel, getattr(sm, name).kernel
        assert a.shape == b.shape and a.get_metadata().get("out_sharding") == \
            b.get_metadata().get("out_sharding")
    assert layer.feature_map_q.w.get_metadata()["out_sharding"] == ("heads", None, None)


@nnx.jit(static_argnames="mode")
def _call(layer, x, positions, cache=None, mode="train"):
    return layer(x, positions=positions, cache=cache, mode=mode)


def _aux_forward(layer, x, positions):
    """(y, [every sown aux_loss]) of a train-mode call."""
    fwd = nnx.capture(lambda m, x: m(x, positions=positions), nnx.Intermediate)
    (y, _), inter = fwd(layer, x)
    leaves = jax.tree_util.tree_leaves_with_path(inter)
    return y, [v for path, v in leaves if "aux_loss" in jax.tree_util.keystr(path)]


def test_distill_mode_returns_softmax_output_and_sows_loss():
    B, T = 2, 17
    cfg = _cfg(hedgehog_distill=True)
    layer = _layer(cfg)
    _perturb_feature_maps(layer)
    with nnx.use_eager_sharding(False):
        sm = SoftmaxAttention(cfg, rngs=nnx.Rngs(1))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # a softmax checkpoint transfers as is
        getattr(layer, name).kernel[...] = getattr(sm, name).kernel[...]
    x, pos = _x(B, T, cfg.d_model, seed=2), _positions(B, T)
    y_soft, _ = _call(sm, x, pos)
    y, losses = nnx.jit(_aux_forward)(layer, x, pos)
    np.testing.assert_allclose(y, y_soft, rtol=1e-5, atol=1e-6)
    assert len(losses) == 1 and losses[0].shape == () and np.isfinite(float(losses[0]))
    # without distillation: the linear output (different) and no aux loss
    lin = _layer(_cfg())
    nnx.update(lin, nnx.state(layer))
    y_lin, losses_lin = nnx.jit(_aux_forward)(lin, x, pos)
    assert losses_lin == [] and not np.allclose(y_lin, y_soft, atol=1e-4)


def test_distill_gradient_step_on_feature_maps_lowers_loss():
    B, T = 2, 16
    cfg = _cfg(hedgehog_distill=True, d_model=16, num_heads=2, num_kv_heads=1)
    layer = _layer(cfg)
    with nnx.use_eager_sharding(False):  # sharper teacher attention: larger q/k projections
        for name in ("q_proj", "k_proj"):
            kern = getattr(layer, name).kernel
            kern[...] = kern[...] * 25.0
    x, pos = _x(B, T, cfg.d_model, seed=3), _positions(B, T)
    fm = nnx.Any(nnx.PathContains("feature_map_q"), nnx.PathContains("feature_map_k"))
    trainable = nnx.All(nnx.Param, fm)

    def loss_fn(m):
        _, losses = _aux_forward(m, x, pos)
        return sum(losses)

    loss_and_grad = nnx.jit(nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable)))
    before, grads = loss_and_grad(layer)
    before = float(before)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert paths and all("feature_map" in p for p in paths)
    for name in ("feature_map_q", "feature_map_k"):  # both maps shape Â
        assert float(jnp.sum(grads[name]["w"][...] ** 2)) > 0, name
    kernels = {n: getattr(layer, n).kernel[...] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    params = nnx.state(layer, trainable)
    nnx.update(layer, jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads))
    after = float(loss_and_grad(layer)[0])
    assert after < before - 1e-4, (before, after)
    for n, k in kernels.items():  # nothing else moved
        np.testing.assert_array_equal(getattr(layer, n).kernel[...], k)


@pytest.mark.parametrize("prompt,d_model", [(1, 32), (9, 32), (9, 64)])
def test_prefill_then_decode_equals_full(prompt, d_model):
    B, T = 2, 20
    cfg = _cfg(d_model=d_model)  # head_dim 8 and 16
    layer = _layer(cfg, seed=4)
    _perturb_feature_maps(layer, seed=4)
    x = _x(B, T, cfg.d_model, seed=5)
    y_full, _ = _call(layer, x, _positions(B, T))
    cache = layer.init_cache(B, T)
    y0, cache = _call(layer, x[:, :prompt], _positions(B, prompt), cache, mode="prefill")
    ys = [y0]
    for t in range(prompt, T):
        yt, cache = _call(layer, x[:, t:t + 1], _positions(B, 1, t), cache, mode="decode")
        ys.append(yt)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full, rtol=1e-5, atol=1e-6)
    # the cache is the state: z sums the key features of all T tokens (2 per token and head)
    np.testing.assert_allclose(cache["z"].sum(-1), 2.0 * T, rtol=1e-5)


def test_lm_with_hedgehog_generates_like_full_recompute():
    """Through the registry inside the LM: greedy generation's logits (prefill + decode with the
    recurrent state) equal the train-mode logits of the generated sequence."""
    from conftest import make_tiny_config
    from models.lm import LM, generate

    cfg = make_tiny_config("model.attention=hedgehog")
    with nnx.use_eager_sharding(False):
        model = LM(cfg.model, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].attn, HedgehogAttention)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)), jnp.int32)
    new, step_logits = generate(model, prompt, 7, return_logits=True)
    full, _ = nnx.jit(lambda m, t: m(t))(model, jnp.concatenate([prompt, new], 1))
    assert np.all(np.isfinite(np.asarray(full)))
    np.testing.assert_allclose(step_logits, full[:, 4:-1], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bidirectional
def test_bidirectional_equals_the_unmasked_quadratic_form():
    """model.causal=False (encoders): phi_q (sum_j phi_k_j^T v_j) / (phi_q sum_j phi_k_j) is
    the unmasked quadratic form; the distillation pieces drop the mask alike."""
    from attention.hedgehog import hedgehog_bidirectional_attention

    phi_q, phi_k, v = _phis(2, 11, 3, 8, 5, seed=3)
    y = hedgehog_bidirectional_attention(phi_q, phi_k, v)
    y_ref, a_hat = hedgehog_quadratic_attention(phi_q, phi_k, v, causal=False)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(a_hat) > 0)  # every key seen, above the diagonal too
    np.testing.assert_allclose(np.asarray(a_hat).sum(-1), 1.0, rtol=1e-5)
    q, k = _randn((1, 6, 2, 8), 1), _randn((1, 6, 2, 8), 2)
    a = softmax_attention_weights(q, k, causal=False)
    assert np.all(np.asarray(a) > 0)
    # L >= H(A), equality at Â = A, over every entry
    entropy = -float(jnp.mean(jnp.sum(a * jnp.log(a), -1)))
    assert float(distillation_loss(a, a, causal=False)) == pytest.approx(entropy, rel=1e-5)
    assert float(distillation_loss(a, jnp.full_like(a, 1 / 6), causal=False)) > entropy


def test_bidirectional_layer_sees_every_token_and_is_permutation_equivariant():
    """Without positions (rope_theta = 0, a ViT's setting) a bidirectional layer commutes with
    permuting the tokens; the first token's output depends on the last token, unlike causal."""
    cfg = _cfg(rope_theta=0.0, causal=False)
    layer = _layer(cfg)
    _perturb_feature_maps(layer)
    B, T = 2, 9
    x = _x(B, T, cfg.d_model)
    y, cache = _call(layer, x, _positions(B, T))
    assert cache is None
    perm = np.random.default_rng(0).permutation(T)
    y_perm, _ = _call(layer, x[:, perm], _positions(B, T))
    np.testing.assert_allclose(np.asarray(y_perm), np.asarray(y)[:, perm], rtol=1e-4, atol=1e-5)
    x2 = x.at[:, -1].add(1.0)
    assert not np.allclose(np.asarray(_call(layer, x2, _positions(B, T))[0])[:, 0],
                           np.asarray(y)[:, 0])
    with pytest.raises(ValueError, match="mode='train' only"):
        layer(x, positions=_positions(B, T), cache=layer.init_cache(B, T), mode="prefill")
