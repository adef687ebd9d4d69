"""MoH attention (attention/moh.py): zero routers with every head active is exactly the softmax
layer; unselected heads contribute nothing; the load-balance loss is k when balanced and is
sown; the gates get gradients; decode == full recompute; bidirectional in a tiny ViT."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention.moh import MoHAttention, load_balance_loss
from attention.softmax import SoftmaxAttention
from conftest import assert_decode_matches_recompute


def _randn(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(**kw):
    base = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=0, num_layers=2,
                rope_theta=10000.0, moh_shared_heads=1, moh_top_k=2, moh_aux_weight=0.01)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _layer(cls, cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return cls(cfg, rngs=nnx.Rngs(seed))


def _positions(B, T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _zero_routers(layer):
    for name in ("router", "shared_router", "group_router"):
        lin = getattr(layer, name)
        if lin is not None:
            lin.kernel[...] = jnp.zeros_like(lin.kernel[...])


def test_registered_and_loads_softmax_params():
    assert attention.get("moh") is MoHAttention
    m, s = _layer(MoHAttention, _cfg()), _layer(SoftmaxAttention, _cfg())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # same names, shapes, init
        np.testing.assert_array_equal(getattr(m, name).kernel[...], getattr(s, name).kernel[...])
    assert m.router.kernel.shape == (32, 3)
    assert m.shared_router is None and m.group_router.kernel.shape == (32, 2)  # h_s = 1
    m2 = _layer(MoHAttention, _cfg(moh_shared_heads=2))
    assert m2.shared_router.kernel.shape == (32, 2) and m2.router.kernel.shape == (32, 2)


@pytest.mark.parametrize("shared,causal", [(1, True), (2, False), (0, True)])
def test_zero_routers_all_heads_equal_softmax(shared, causal):
    """Zero routers, k = E: alpha = 0.5 * 2, shared softmax(0) * h_s = 1, routed renormalised
    * k = 1: every gate is 1 and the layer is the softmax layer (same q/k/v/o)."""
    H = 4
    cfg = _cfg(moh_shared_heads=shared, moh_top_k=H - shared, causal=causal)
    m, s = _layer(MoHAttention, cfg), _layer(SoftmaxAttention, cfg)
    _zero_routers(m)
    x = _randn((2, 9, 32), 1)
    pos = _positions(2, 9)
    gates = m.gates(x)[0]
    np.testing.assert_allclose(gates, 1.0, atol=1e-6)
    np.testing.assert_allclose(m(x, positions=pos)[0], s(x, positions=pos)[0], atol=1e-6)


def test_unselected_head_contributes_nothing():
    """Perturbing the q/k/v weights of a routed head leaves unchanged the output of every token
    that did not select it (MHA: one key/value head per query head), and changes the others."""
    cfg = _cfg(num_kv_heads=4, moh_shared_heads=1, moh_top_k=1)
    m = _layer(MoHAttention, cfg)
    m.router.kernel[...] = _randn(m.router.kernel.shape, 5, 1.0)  # varied routing
    x = _randn((2, 16, 32), 2)
    pos = _positions(2, 16)
    y0 = m(x, positions=pos)[0]
    _, _, selected = m.gates(x)
    hd = m.head_dim
    head = 2  # query head 2 = routed head 1
    sel = np.asarray(selected[..., head - m.shared_heads]) > 0
    assert sel.any() and (~sel).any()
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(m, name).kernel
        w[...] = w[...].at[:, head * hd:(head + 1) * hd].add(_randn((32, hd), 7, 1.0))
    y1 = m(x, positions=pos)[0]
    np.testing.assert_array_equal(np.asarray(y1)[~sel], np.asarray(y0)[~sel])
    assert np.abs(np.asarray(y1 - y0)[sel]).max() > 1e-4


def test_load_balance_is_k_when_balanced():
    """E = 4 routed heads, k = 2: tokens cycle through the pairs so every head is selected by
    half of the tokens (f_i = k / E) and the mean probability is uniform (P_i = 1 / E)."""
    E, k = 4, 2
    pairs = [(0, 1), (2, 3), (1, 2), (3, 0)]
    selected = np.zeros((2, 8, E), np.float32)
    probs = np.zeros((2, 8, E), np.float32)
    for t in range(8):
        a, b = pairs[t % 4]
        selected[:, t, [a, b]] = 1
        probs[:, t] = 0.1
        probs[:, t, [a, b]] = 0.4  # the top-2 of this token
    assert np.allclose(selected.mean((0, 1)), k / E) and np.allclose(probs.mean((0, 1)), 1 / E)
    np.testing.assert_allclose(load_balance_loss(jnp.asarray(probs), jnp.asarray(selected)), k,
                               rtol=1e-6)
    # all tokens on the same pair with peaked probabilities: larger
    s2 = np.zeros_like(selected)
    s2[..., :2] = 1
    p2 = np.full_like(probs, 0.05)
    p2[..., :2] = 0.45
    assert float(load_balance_loss(jnp.asarray(p2), jnp.asarray(s2))) > k


def test_aux_loss_sown_and_routers_get_gradients():
    cfg = _cfg(moh_shared_heads=2, moh_top_k=1)
    m = _layer(MoHAttention, cfg)
    x = _randn((2, 8, 32), 3)
    pos = _positions(2, 8)
    _, inter = nnx.capture(m, nnx.Intermediate)(x, positions=pos)
    (aux,) = [v for p, v in jax.tree_util.tree_leaves_with_path(inter)
              if any(getattr(e, "key", None) == "aux_loss" for e in p)]
    probs, selected = m.gates(x)[1:]
    np.testing.assert_allclose(aux, 0.01 * load_balance_loss(probs, selected), rtol=1e-6)

    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params):
        mod = nnx.merge(graphdef, params, rest)
        (y, _), inter = nnx.capture(mod, nnx.Intermediate)(x, positions=pos)
        aux = sum(jnp.sum(a) for a in jax.tree.leaves(inter))
        return jnp.sum(y ** 2) + aux

    grads = jax.grad(loss)(params)
    for name in ("router", "shared_router", "group_router"):
        g = np.asarray(grads[name]["kernel"][...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_decode_equals_full_recompute():
    """Prefill a prompt then decode token by token with the cache == the train-mode forward."""
    cfg = _cfg()
    assert_decode_matches_recompute(_layer(MoHAttention, cfg), _randn((2, 10, 32), 4), 4)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="moh_top_k"):
        _layer(MoHAttention, _cfg(moh_top_k=4))
    with pytest.raises(ValueError, match="moh_shared_heads"):
        _layer(MoHAttention, _cfg(moh_shared_heads=4))


def test_vit_moh_variant_forward_and_loss():
    """configs/vit.py:moh: bidirectional MoH in the tiny ViT; the load-balance loss is part of
    the task loss."""
    import os

    from conftest import REPO_ROOT
    from models.vit import ViT
    from trainer import load_config

    c = load_config(os.path.join(REPO_ROOT, "configs", "vit.py") + ":moh", [])
    m = c.model
    assert m.attention == "moh" and not m.causal
    E = m.num_heads - m.moh_shared_heads
    assert m.moh_top_k == 0.75 * E
    with nnx.use_eager_sharding(False):
        model = ViT(c.model, image_size=c.data.image_size, rngs=nnx.Rngs(0))
    images = _randn((2, c.data.image_size, c.data.image_size, 3), 6)
    (tokens, pooled), inter = nnx.capture(model, nnx.Intermediate)(images)
    assert pooled.shape == (2, m.d_model) and np.isfinite(np.asarray(tokens)).all()
    aux = [v for p, v in jax.tree_util.tree_leaves_with_path(inter)
           if any(getattr(e, "key", None) == "aux_loss" for e in p)]
    assert len(aux) == m.num_layers
