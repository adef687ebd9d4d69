"""The CPU fast paths of softmax attention are exact reformulations: the blocked causal attention
(attention/ops/causal.py) against the masked dense softmax, and `materialize`
(attention/ops/fusion.py) as the identity, values and gradients; the LM's loss curve does not
change with them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config, run_trainer
from jax import lax

from attention.ops.causal import causal_attention
from attention.ops.fusion import materialize, on_rows
from pallas_kernels import platform

HI = lax.Precision.HIGHEST


def masked_dense(q, k, v):
    """The plain reference: softmax(q k^T / sqrt(d) + M) v with M = -inf above the diagonal."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HI) / np.sqrt(D)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=HI)


@pytest.mark.parametrize("B,T,H,Hkv,D,block", [
    (2, 100, 4, 2, 16, 32),   # T not a multiple of the block, GQA 2:1
    (1, 64, 2, 2, 8, 64),     # one block = dense
    (2, 130, 4, 1, 16, 64),   # MQA, a 2-row last block
    (1, 7, 2, 1, 4, 3),       # tiny blocks
])
def test_blocked_equals_masked_dense(B, T, H, Hkv, D, block):
    ks = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(kk, (B, T, Hkv, D)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, H, D))

    def grads(f):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * w),
                                          argnums=(0, 1, 2)))(q, k, v)

    with jax.default_matmul_precision("highest"):
        got = grads(lambda q, k, v: causal_attention(q, k, v, block=block, impl="blocked"))
    want = grads(masked_dense)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


def test_blocked_bf16_and_auto_choice():
    q = jax.random.normal(jax.random.key(0), (1, 200, 2, 32), jnp.bfloat16)
    o = causal_attention(q, q, q, block=64, impl="blocked")
    assert o.dtype == jnp.bfloat16
    ref = masked_dense(*(x.astype(jnp.float32) for x in (q, q, q)))
    err = jnp.sqrt(jnp.mean((o.astype(jnp.float32) - ref) ** 2) / jnp.mean(ref ** 2))
    assert err < 1e-2
    # auto: blocked on CPU past one block, the dense (cuDNN / XLA) form on GPU and TPU
    text = lambda: str(jax.make_jaxpr(lambda q: causal_attention(q, q, q, block=64))(q))
    assert "custom_vjp" in text()
    with platform.target_backend("tpu"):
        assert "custom_vjp" not in text()
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_attention(q, q, q, impl="flash")


def test_materialize_is_the_identity_with_a_barrier_on_cpu_only():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    f = lambda x: jnp.sum(jnp.tanh(materialize(x * 2)) ** 2)
    np.testing.assert_allclose(jax.grad(f)(x),
                               jax.grad(lambda x: jnp.sum(jnp.tanh(x * 2) ** 2))(x), rtol=1e-6)
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(f))(x))
    with platform.target_backend("gpu"):
        assert "optimization_barrier" not in str(jax.make_jaxpr(jax.grad(f))(x))


def test_projection_on_rows_is_exact_and_needs_no_transposed_cotangent():
    """A Dense layer (attention/layers.py) on x [B, T, D] computes on the [B T, D] rows on CPU:
    the same values and gradients as nnx.Linear on the 3-D x, and its weight gradient compiles
    without the transposed [D_out, B T] copy of the cotangent the 3-D dot_general costs."""
    from flax import nnx

    from attention.layers import Dense

    x = jax.random.normal(jax.random.key(0), (3, 40, 24))
    layer = Dense(24, 56, rngs=nnx.Rngs(0))
    ref = nnx.Linear(24, 56, rngs=nnx.Rngs(0))
    assert (layer.kernel[...] == ref.kernel[...]).all()

    def loss(m, x):
        return jnp.sum(jnp.tanh(m(x)) ** 2)

    got = nnx.grad(loss, argnums=(0, 1))(layer, x)
    want = nnx.grad(loss, argnums=(0, 1))(ref, x)
    np.testing.assert_allclose(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0].kernel[...], want[0].kernel[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0].bias[...], want[0].bias[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)

    def hlo(m):
        gd, state = nnx.split(m)
        g = jax.jit(lambda s, x: jax.grad(lambda s: loss(nnx.merge(gd, s), x))(s))
        return g.lower(state, x).compile().as_text()

    transposed = "f32[56,120]"  # the cotangent [B T, D_out] written transposed
    assert transposed not in hlo(layer)
    assert transposed in hlo(ref)  # the layout XLA:CPU picks for the 3-D form (what on_rows avoids)
    # 2-D inputs and other backends: the call as is
    assert on_rows(lambda r: r.shape, jnp.zeros((5, 3))) == (5, 3)
    with platform.target_backend("gpu"):
        assert on_rows(lambda r: r.shape, x) == (3, 40, 24)
    assert on_rows(lambda r: r[:, :2], x).shape == (3, 40, 2)


def test_lm_loss_curve_unchanged_by_the_cpu_attention(tmp_path):
    """Three optimizer steps of the tiny LM: the blocked attention (auto on CPU, blocks of 16
    at seq 32) and the dense form give the same losses."""
    runs = {impl: run_trainer(make_tiny_config("mesh.data=1", f"model.softmax_impl={impl}",
                                               "model.softmax_block=16"),
                              tmp_path / impl, devices=jax.devices()[:1])
            for impl in ("auto", "dense")}
    assert sorted(runs["auto"].losses) == sorted(runs["dense"].losses) == [1, 2, 3]
    for step, loss in runs["auto"].losses.items():
        assert abs(loss - runs["dense"].losses[step]) < 1e-5, (step, loss, runs["dense"].losses)
