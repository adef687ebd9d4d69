"""Kernels inside a sharded model: each device runs the Pallas kernel on its batch / head slice
(`pallas_kernels.platform.per_shard`, a shard_map: Mosaic kernels cannot be partitioned
automatically). On the 8 simulated CPU devices (interpret mode) the sharded result and gradients
must equal the plain reference, for meshes that split the batch, the heads, both, or (when a
dimension does not divide) neither.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from attention.ops.block_sparse import BlockMask, block_sparse_attention
from attention.ops.gla import gla
from pallas_kernels import platform

MESHES = [(2, 2, 2), (1, 1, 8), (8, 1, 1)]  # (data, fsdp, tensor)


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _sharded_run(mesh, f, args, specs):
    """jit(f) on the args placed by `specs` (a batch the mesh cannot split is replicated)."""
    if args[0].shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        specs = [P() for _ in specs]
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(f)(*args))
        out = jax.jit(f)(*args)
    return jax.device_get(out), jaxpr


def _assert_close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_gla_pallas_per_shard_equals_reference(mesh_shape):
    B, T, H, K, V = 4, 40, 8, 16, 8
    ks = jax.random.split(jax.random.key(0), 6)
    q, k = (jax.random.normal(kk, (B, T, H, K)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, V))
    log_g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K))) / 4
    h0 = jax.random.normal(ks[4], (B, H, K, V))
    w = jax.random.normal(ks[5], (B, T, H, V))

    def loss(impl):
        def f(q, k, v, log_g, h0):
            o, s = gla(q, k, v, log_g, initial_state=h0, output_final_state=True,
                       chunk_size=16, impl=impl)
            return jnp.sum(o * w) + jnp.sum(s ** 2)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))

    want = jax.jit(loss("reference"))(q, k, v, log_g, h0)
    mesh = _mesh(mesh_shape)
    bt = P(("data", "fsdp"), None, "tensor", None)
    got, jaxpr = _sharded_run(mesh, loss("pallas"), (q, k, v, log_g, h0),
                              (bt, bt, bt, bt, P(("data", "fsdp"), "tensor")))
    assert "shard_map" in jaxpr
    _assert_close(got, want, 2e-4)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("broadcast", [False, True])
def test_block_sparse_pallas_per_shard_equals_reference(mesh_shape, broadcast):
    """GQA (8 query heads over 2 kv heads: the kv heads cannot be split 8 ways, so on the
    tensor=8 mesh they stay whole) and a per-(batch, head) or broadcast mask."""
    B, T, H, Hkv, D, bq = 4, 40, 8, 2, 16, 8
    nb = T // bq
    rng = np.random.default_rng(0)
    dense = rng.random((1 if broadcast else B, 1 if broadcast else H, nb, nb)) < 0.5
    dense |= np.eye(nb, dtype=bool)  # every row has a block (the diagonal one)
    mask = BlockMask.from_dense(jnp.asarray(dense), bq, bq, q_len=T, k_len=T)
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(kk, (B, T, Hkv, D)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, H, D))

    def loss(impl):
        def f(q, k, v):
            o, lse = block_sparse_attention(q, k, v, mask, causal=True, impl=impl,
                                            return_lse=True)
            return jnp.sum(o * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return jax.value_and_grad(f, argnums=(0, 1, 2))

    want = jax.jit(loss("reference"))(q, k, v)
    mesh = _mesh(mesh_shape)
    bt = P(("data", "fsdp"), None, "tensor", None)
    got, jaxpr = _sharded_run(mesh, loss("pallas"), (q, k, v), (bt, P(("data", "fsdp")),
                                                                P(("data", "fsdp"))))
    assert "shard_map" in jaxpr
    _assert_close(got, want, 2e-4)


def test_no_mesh_calls_the_kernel_directly():
    calls = []
    out = platform.per_shard(lambda x: (calls.append(x.shape) or x * 2,), (jnp.ones((4, 2)),),
                             (0,), (None,), (0,), (None,))
    assert calls == [(4, 2)] and float(out[0].sum()) == 16.0


def test_target_backend_switches_auto_and_interpret():
    assert platform.backend() == jax.default_backend() == "cpu"
    assert platform.interpret_default()
    with platform.target_backend("tpu"):
        assert platform.backend() == "tpu" and not platform.interpret_default()
        with platform.target_backend("gpu"):
            assert platform.is_gpu()
        assert platform.backend() == "tpu"
    assert platform.backend() == "cpu"
