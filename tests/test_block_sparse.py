"""attention.ops.block_sparse: BlockMask layouts and constructors, and the gathered (xla) op
against the dense masked reference (forward, lse, dq, dk, dv)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.ops.block_sparse import (BlockMask, block_sparse_attention, causal_blocks,
                                        dense_causal_mask, local_blocks, sink_blocks)


def random_mask(key, shape, density):
    """bool block mask with the given density; every row keeps one random block."""
    k1, k2 = jax.random.split(key)
    m = jax.random.uniform(k1, shape) < density
    forced = jax.random.randint(k2, shape[:-1], 0, shape[-1])
    return m | (jnp.arange(shape[-1]) == forced[..., None])


def inputs(B=2, T=100, S=90, H=4, Hk=2, D=16, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, Hk, D), dtype)
    v = jax.random.normal(ks[2], (B, S, Hk, D), dtype)
    return q, k, v


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_xla_equals_reference_forward_lse_and_grads(density, causal):
    q, k, v = inputs()
    bq, bk = 16, 8  # T = 100, S = 90: both end in a partial block
    nq, nk = -(-100 // bq), -(-90 // bk)
    dense = random_mask(jax.random.key(int(density * 10) + causal), (2, 4, nq, nk), density)
    mask = BlockMask.from_dense(dense, bq, bk, q_len=100, k_len=90)

    def run(impl):
        return jax.vjp(lambda q, k, v: block_sparse_attention(q, k, v, mask, causal=causal,
                                                              impl=impl, return_lse=True), q, k, v)

    (o_r, l_r), vjp_r = run("reference")
    (o_x, l_x), vjp_x = run("xla")
    assert o_x.shape == q.shape and l_x.shape == (2, 4, 100)
    assert rel_err(o_x, o_r) < 1e-5
    seen = np.isfinite(np.asarray(l_r))  # causal rows whose blocks all lie in the future see nothing
    np.testing.assert_array_equal(np.isfinite(np.asarray(l_x)), seen)
    np.testing.assert_allclose(np.asarray(l_x)[seen], np.asarray(l_r)[seen], atol=1e-5)
    cot = (jax.random.normal(jax.random.key(5), o_r.shape),
           jnp.where(seen, jax.random.normal(jax.random.key(6), l_r.shape), 0.0))
    for name, gx, gr in zip(("dq", "dk", "dv"), vjp_x(cot), vjp_r(cot)):
        assert np.all(np.isfinite(np.asarray(gx))), name
        assert rel_err(gx, gr) < 1e-5, (name, rel_err(gx, gr))


def test_full_mask_equals_dense_softmax():
    q, k, v = inputs(T=70, S=70, Hk=4)
    for causal in (False, True):
        mask = BlockMask.from_dense(jnp.ones((1, 1, 5, 9), bool), 16, 8, q_len=70, k_len=70)
        o = block_sparse_attention(q, k, v, mask, causal=causal, impl="xla")
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        assert rel_err(o, expected) < 1e-5
    o = block_sparse_attention(q, k, v, dense_causal_mask(70, 70, 16, 8), causal=True)
    assert rel_err(o, jax.nn.dot_product_attention(q, k, v, is_causal=True)) < 1e-5


def test_bf16_inputs():
    q, k, v = inputs(dtype=jnp.bfloat16)
    mask = BlockMask.from_dense(random_mask(jax.random.key(3), (1, 1, 7, 12), 0.5), 16, 8,
                                q_len=100, k_len=90)
    o = block_sparse_attention(q, k, v, mask, causal=True, impl="xla")
    r = block_sparse_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, causal=True,
                               impl="reference")
    assert o.dtype == jnp.bfloat16
    err = jnp.sqrt(jnp.mean((o.astype(jnp.float32) - r) ** 2) / jnp.mean(r ** 2))
    assert float(err) < 1e-2


def test_from_dense_round_trip_and_layouts():
    dense = random_mask(jax.random.key(0), (2, 3, 6, 9), 0.4)
    m = BlockMask.from_dense(dense, 8, 8)
    d = np.asarray(dense)
    np.testing.assert_array_equal(np.asarray(m.to_dense()), d)
    np.testing.assert_array_equal(np.asarray(m.to_dense_transposed()), d)
    np.testing.assert_array_equal(np.asarray(m.counts), d.sum(-1))
    np.testing.assert_array_equal(np.asarray(m.t_counts), d.sum(-2))
    assert m.max_blocks == d.sum(-1).max()
    idx, cnt = np.asarray(m.indices), np.asarray(m.counts)
    for row, c in zip(idx.reshape(-1, m.max_blocks), cnt.reshape(-1)):
        assert np.all(np.diff(row[:c]) > 0)          # ascending, unique
        assert np.all(row[c:] == row[c - 1])          # padded by repeating the last index
    # the mask is a pytree: it crosses jit and keeps its static fields
    m2 = jax.jit(lambda m: m)(m)
    assert (m2.block_q, m2.q_len, m2.max_blocks) == (8, 48, m.max_blocks)


def test_from_indices_matches_dense():
    idx = jnp.array([[[[3, 1, 1], [0, 5, -1], [2, 2, 2]]]])  # duplicates and an ignored -1
    m = BlockMask.from_indices(idx, 6, 4, 4)
    expected = np.zeros((1, 1, 3, 6), bool)
    expected[0, 0, 0, [1, 3]] = expected[0, 0, 1, [0, 5]] = expected[0, 0, 2, 2] = True
    np.testing.assert_array_equal(np.asarray(m.to_dense()), expected)
    # under jit (traced indices) the width stays static
    mj = jax.jit(lambda i: BlockMask.from_indices(i, 6, 4, 4))(idx)
    np.testing.assert_array_equal(np.asarray(mj.to_dense()), expected)


def test_patterns():
    c = np.asarray(causal_blocks(4, 8, 16, 8))     # query block i covers 16i..16i+15
    assert c[0].tolist() == [True, True] + [False] * 6 and c[3].all()
    w = np.asarray(local_blocks(4, 8, 16, 8, window=16))  # last 16 tokens up to the query
    assert w[2].tolist() == [False, False, True, True, True, True, False, False]
    s = np.asarray(sink_blocks(4, 8, 8, sink_tokens=10))
    assert s[:, :2].all() and not s[:, 2:].any()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="query block 1 .* attends to no key block"):
        BlockMask.from_dense(jnp.array([[True, False], [False, False]]), 4, 4)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        BlockMask.from_dense(jnp.ones((2, 2), bool), 4, 4, q_len=10)
    q, k, v = inputs(T=32, S=32)
    with pytest.raises(ValueError, match="built for q_len=16"):
        block_sparse_attention(q, k, v, BlockMask.from_dense(jnp.ones((2, 4), bool), 8, 8))
    with pytest.raises(ValueError, match="impl must be one of"):
        block_sparse_attention(q, k, v, dense_causal_mask(32, 32, 8, 8), impl="cuda")


def test_pairs_counts_the_computed_token_pairs():
    T, S = 70, 70
    full = BlockMask.from_dense(jnp.ones((5, 9), bool), 16, 8, q_len=T, k_len=S)
    assert float(full.pairs(causal=False)[0, 0]) == T * S
    assert float(full.pairs(causal=True)[0, 0]) == T * (T + 1) / 2
    assert float(dense_causal_mask(T, S, 16, 8).pairs(causal=True)[0, 0]) == T * (T + 1) / 2
    one = BlockMask.from_dense(jnp.eye(5, 9, dtype=bool), 16, 8, q_len=T, k_len=S)
    # query block i sees key block i (keys 8i..8i+7), all of them in the past of its 16 queries
    # except inside block 0, where query r sees keys 0..r
    expected = (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 8 * 8) + 16 * 8 * 3 + 6 * 8
    assert float(one.pairs(causal=True)[0, 0]) == expected


def test_auto_that_cannot_take_the_kernel_says_so_once_naming_the_caller(monkeypatch):
    """impl="auto" off the kernel's chip (here GPU: the kernels are TPU-only) runs the XLA path
    and warns once per caller and reason; CPU's XLA path is the plan and says nothing."""
    import warnings

    from attention.ops.gla import gla
    from pallas_kernels import platform

    monkeypatch.setattr(platform, "_FALLBACKS_SAID", set())
    T, b = 64, 16
    mask = BlockMask.from_dense(causal_blocks(T // b, T // b, b, b), b, b, q_len=T, k_len=T)
    q = jnp.ones((1, T, 2, 8))
    run = lambda caller: jax.make_jaxpr(lambda q: block_sparse_attention(
        q, q, q, mask, causal=True, caller=caller))(q)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run("SomeMechanism")  # CPU: nothing to say
        assert not said
        with platform.target_backend("gpu"):
            run("SomeMechanism")
            run("SomeMechanism")
            run("OtherMechanism")
            jax.make_jaxpr(lambda q: gla(q, q, q, -jnp.ones_like(q), caller="SomeGLA"))(q)
    messages = [str(w.message) for w in said]
    assert len(messages) == 3, messages
    assert messages[0].startswith("SomeMechanism: impl='auto' runs the XLA path on gpu, not the "
                                  "block-sparse Pallas kernel: its GPU kernels (impl='pallas') are not "
                                  "yet timed")
    assert messages[1].startswith("OtherMechanism:") and messages[2].startswith("SomeGLA:")
