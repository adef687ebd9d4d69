"""The Pallas block-sparse flash-attention kernels (interpret mode on CPU) against the dense
reference: forward o and lse, and dq / dk / dv through the custom VJP with random cotangents for
o *and* lse, on awkward shapes (T, S not multiples of the blocks), GQA and broadcast masks."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.ops.block_sparse import BlockMask, block_sparse_attention

_NAMES = ("o", "lse", "dq", "dk", "dv")


def _random_mask(rng, shape, density):
    """bool [Bm, Hm, NQ, NK] of about `density`, every row with >= 1 active block."""
    m = rng.random(shape) < density
    nq, nk = shape[-2:]
    rows = m.reshape(-1, nq, nk)
    for r in rows:
        r[np.arange(nq), rng.integers(0, nk, nq)] = True
    return rows.reshape(shape)


def _inputs(seed, B, T, S, H, Hkv, D, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), dtype)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), dtype)
    do = jax.random.normal(ks[3], (B, T, H, D), dtype)
    dlse = jax.random.normal(ks[4], (B, H, T), jnp.float32)
    return q, k, v, do, dlse


@functools.partial(jax.jit, static_argnames="causal")
def _run_both(q, k, v, do, dlse, mask, causal):
    """(o, lse, dq, dk, dv) for impl='reference' and impl='pallas'."""
    out = {}
    for impl in ("reference", "pallas"):
        f = lambda q, k, v: block_sparse_attention(q, k, v, mask, causal=causal, impl=impl,
                                                   return_lse=True)
        (o, lse), vjp = jax.vjp(f, q, k, v)
        out[impl] = (o, lse) + vjp((do, dlse))
    return out


def _compare(out, *, tol, metric):
    for name, ref, got in zip(_NAMES, out["reference"], out["pallas"]):
        ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
        assert ref.shape == got.shape, name
        finite = np.isfinite(ref)
        # -inf lse exactly where the reference has it; nothing else non-finite, never NaN
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
        if name == "lse":
            np.testing.assert_array_equal(got[~finite], ref[~finite], err_msg=name)
        r, g = ref[finite], got[finite]
        if metric == "max":
            err = np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1.0)
        else:  # relative RMSE
            err = np.sqrt(np.mean((g - r) ** 2) / max(np.mean(r ** 2), 1e-12))
        assert err < tol, f"{name}: {metric} error {err:.3g} >= {tol}"


# (density, causal, H, H_kv, mask broadcast over batch/heads)
_F32_CASES = [
    (0.1, False, 4, 2, False),
    (0.1, True, 4, 4, True),
    (0.5, True, 4, 2, False),
    (0.5, False, 4, 2, True),
    (1.0, True, 4, 2, True),
    (1.0, False, 2, 2, False),
]


@pytest.mark.parametrize("density,causal,H,Hkv,broadcast", _F32_CASES)
def test_pallas_matches_reference_f32(density, causal, H, Hkv, broadcast):
    B, T, S, D, bq, bk = 2, 45, 53, 16, 8, 16      # T, S not multiples of the blocks
    rng = np.random.default_rng(int(density * 10) + 7 * causal + H)
    nq, nk = -(-T // bq), -(-S // bk)
    mshape = (1, 1, nq, nk) if broadcast else (B, H, nq, nk)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, mshape, density)), bq, bk,
                                q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(0, B, T, S, H, Hkv, D, jnp.float32)
    _compare(_run_both(q, k, v, do, dlse, mask, causal), tol=1e-5, metric="max")


@pytest.mark.parametrize("bq,bk,causal", [(50, 50, True), (10, 13, False), (12, 24, True)])
def test_pallas_matches_reference_blocks_not_multiples_of_8(bq, bk, causal):
    """Landmark's 50-token blocks, Routing's T / C: each block sits in a tile padded to a
    multiple of 8 rows (padded keys masked, padded queries sliced off) on every path."""
    B, T, S, H, Hkv, D = 1, 137, 137 if causal else 101, 4, 2, 16
    rng = np.random.default_rng(bq + bk)
    nq, nk = -(-T // bq), -(-S // bk)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (B, H, nq, nk), 0.5)), bq, bk,
                                q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(5, B, T, S, H, Hkv, D, jnp.float32)
    _compare(_run_both(q, k, v, do, dlse, mask, causal), tol=1e-5, metric="max")


def test_pallas_matches_reference_cross_lengths_square_blocks():
    """S < T, block_q == block_k == 16, D = 32, a mask broadcast over batch only."""
    B, T, S, H, Hkv, D, bq, bk = 1, 70, 37, 4, 1, 32, 16, 16
    rng = np.random.default_rng(3)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (1, H, 5, 3), 0.5)), bq, bk,
                                q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(1, B, T, S, H, Hkv, D, jnp.float32)
    _compare(_run_both(q, k, v, do, dlse, mask, False), tol=1e-5, metric="max")


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_matches_reference_bf16(causal):
    B, T, S, H, Hkv, D, bq, bk = 2, 45, 53, 4, 2, 16, 8, 16
    rng = np.random.default_rng(11 + causal)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (B, 1, 6, 4), 0.5)), bq, bk,
                                q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(2, B, T, S, H, Hkv, D, jnp.bfloat16)
    out = _run_both(q, k, v, do, dlse, mask, causal)
    assert out["pallas"][0].dtype == jnp.bfloat16 and out["pallas"][1].dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in out["pallas"][2:])
    _compare(out, tol=1e-2, metric="rmse")   # observed ~2e-3 .. 4e-3


def test_row_masked_by_causality():
    """Query block 0 may only see key block 1, which lies entirely in its future: its rows see
    no key, so o = 0 and lse = -inf there, with finite gradients, exactly like the reference."""
    B, T, S, H, Hkv, D, bq, bk = 1, 30, 30, 2, 2, 16, 8, 8
    rng = np.random.default_rng(5)
    m = _random_mask(rng, (1, 1, 4, 4), 0.5)
    m[..., 0, :] = False
    m[..., 0, 1] = True
    mask = BlockMask.from_dense(jnp.asarray(m), bq, bk, q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(3, B, T, S, H, Hkv, D, jnp.float32)
    out = _run_both(q, k, v, do, dlse, mask, True)
    o, lse, dq, dk, dv = (np.asarray(x) for x in out["pallas"])
    assert np.all(o[:, :bq] == 0.0)
    assert np.all(lse[:, :, :bq] == -np.inf)
    assert np.all(np.isfinite(lse[:, :, bq:]))
    assert np.all(dq[:, :bq] == 0.0)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(g))
    _compare(out, tol=1e-5, metric="max")


def test_pallas_default_output_is_o_only():
    """The public op with impl='pallas' and return_lse=False returns o alone, equal to xla's."""
    B, T, S, H, D, bq, bk = 1, 24, 40, 2, 16, 8, 8
    rng = np.random.default_rng(9)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (1, 1, 3, 5), 0.4)), bq, bk,
                                q_len=T, k_len=S)
    q, k, v, _, _ = _inputs(4, B, T, S, H, H, D, jnp.float32)
    o, o_xla = jax.jit(lambda q, k, v, mask: [
        block_sparse_attention(q, k, v, mask, causal=True, impl=impl)
        for impl in ("pallas", "xla")])(q, k, v, mask)
    assert o.shape == q.shape
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_xla), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_lower_to_triton(dtype):
    """On this CPU, jax.export lowers the public op with impl='pallas' for CUDA (an abstract
    H100; Triton itself compiles only on a GPU): forward and backward are the three GPU kernels
    as Triton calls, at odd shapes (T = 137, Landmark's 50-token blocks, head dim 24, GQA); the
    TPU kernels refuse a GPU with a message naming the GPU arrangement."""
    import re

    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh

    from pallas_kernels import platform
    from pallas_kernels.block_sparse import kernels

    B, T, H, Hkv, D, blk = 1, 137, 4, 2, 24, 50
    rng = np.random.default_rng(0)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (1, H, 3, 3), 0.5)), blk, blk,
                                q_len=T, k_len=T)
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(q, k, v, mask, causal=True,
                                                                impl="pallas"), q, k, v)
        return o, vjp(do)

    cuda = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    triton = "__gpu$xla.gpu.triton"
    with platform.target_backend("gpu"), \
            jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=cuda)):
        exported = export.export(jax.jit(fwd_bwd), platforms=("cuda",), disabled_checks=[
            export.DisabledSafetyCheck.custom_call(triton)])(
                sds(B, T, H, D), sds(B, T, Hkv, D), sds(B, T, Hkv, D), sds(B, T, H, D))
        text = exported.mlir_module()
        assert text.count(triton) == 3
        assert set(re.findall(r'name = "(block_sparse_[a-z_]+)"', text)) == {
            "block_sparse_fwd_gpu", "block_sparse_bwd_dq_gpu", "block_sparse_bwd_dkv_gpu"}
        assert [a.shape for a in exported.out_avals] == [(B, T, H, D), (B, T, H, D),
                                                          (B, T, Hkv, D), (B, T, Hkv, D)]
        with pytest.raises(NotImplementedError, match="block_sparse/gpu.py"):
            kernels._compiler_params(False, ("parallel", "arbitrary"))


# ----------------------------------------------------------------------------- the GPU arrangement
@functools.partial(jax.jit, static_argnames="causal")
def _run_gpu_arrangement(q, k, v, do, dlse, mask, causal):
    """(o, lse, dq, dk, dv) for impl='reference' and for block_sparse_pallas's GPU arrangement
    (pallas_kernels/block_sparse/gpu.py: in-kernel loops over the listed blocks, power-of-two
    tiles and head dim) in interpret mode."""
    from pallas_kernels.block_sparse import block_sparse_pallas
    scale = q.shape[-1] ** -0.5
    runs = {"reference": lambda q, k, v: block_sparse_attention(
                q, k, v, mask, causal=causal, impl="reference", return_lse=True),
            "pallas": lambda q, k, v: block_sparse_pallas(
                q, k, v, mask, causal=causal, scale=scale, interpret=True, gpu=True)}
    out = {}
    for name, f in runs.items():
        (o, lse), vjp = jax.vjp(f, q, k, v)
        out[name] = (o, lse) + vjp((do, dlse))
    return out


# (T, S, H, H_kv, D, block_q, block_k, density, causal, mask over batch / heads): odd lengths,
# blocks that are not powers of two (Landmark's 50, 10 x 13, 24), blocks over 128 tokens split
# into sub-blocks (300 -> 3 x 100, 256 -> 2 x 128, the last ones partly past T and S), head dims
# 16, 24 and 40 (padded to 32 / 64), GQA, MQA and masks broadcast over batch, heads or both
_GPU_CASES = [
    (45, 53, 4, 2, 16, 8, 16, 0.3, False, (2, 4)),
    (137, 137, 4, 2, 24, 50, 50, 0.5, True, (2, 4)),
    (137, 101, 2, 1, 40, 10, 13, 0.5, False, (1, 1)),
    (70, 70, 4, 4, 16, 16, 24, 1.0, True, (1, 4)),
    (600, 520, 2, 1, 16, 300, 256, 0.6, True, (2, 1)),
]


@pytest.mark.parametrize("T,S,H,Hkv,D,bq,bk,density,causal,mshape", _GPU_CASES)
def test_gpu_arrangement_matches_reference_f32(T, S, H, Hkv, D, bq, bk, density, causal, mshape):
    B = 2
    rng = np.random.default_rng(T + bq + bk)
    nq, nk = -(-T // bq), -(-S // bk)
    mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (*mshape, nq, nk), density)),
                                bq, bk, q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(6, B, T, S, H, Hkv, D, jnp.float32)
    _compare(_run_gpu_arrangement(q, k, v, do, dlse, mask, causal), tol=1e-5, metric="max")


def test_split_blocks_keeps_the_mask():
    """Blocks over 128 tokens become equal sub-blocks (the fewest parts: 300 -> 3 x 100, 256 ->
    2 x 128, 129 -> 3 x 43): the same token pairs in both layouts, sub-blocks past the sequence
    dropped, the padding slots in range."""
    from pallas_kernels.block_sparse import split_blocks

    rng = np.random.default_rng(4)
    for bq, bk, T, S in ((300, 256, 600, 520), (129, 64, 200, 300), (64, 64, 100, 100)):
        nq, nk = -(-T // bq), -(-S // bk)
        mask = BlockMask.from_dense(jnp.asarray(_random_mask(rng, (2, 3, nq, nk), 0.5)), bq, bk,
                                    q_len=T, k_len=S)
        small = split_blocks(mask)
        assert max(small.block_q, small.block_k) <= 128
        assert mask.block_q % small.block_q == 0 and mask.block_k % small.block_k == 0
        tokens = lambda m: np.repeat(np.repeat(np.asarray(m.to_dense()), m.block_q, -2),  # noqa: E731
                                     m.block_k, -1)[..., :T, :S]
        np.testing.assert_array_equal(tokens(small), tokens(mask))
        np.testing.assert_array_equal(np.asarray(small.to_dense_transposed()),
                                      np.asarray(small.to_dense()))
        assert int(small.indices.max()) < small.num_k_blocks
        assert int(small.t_indices.max()) < small.num_q_blocks
    assert split_blocks(mask) is mask  # nothing over 128: unchanged


def test_gpu_arrangement_bf16_and_rows_that_see_nothing():
    """bf16 in and out; query block 0 lists only a key block in its future (causal): o = 0,
    lse = -inf, finite gradients, as the reference."""
    B, T, S, H, Hkv, D, bq, bk = 2, 61, 61, 4, 2, 16, 16, 16
    m = _random_mask(np.random.default_rng(2), (1, H, 4, 4), 0.5)
    m[..., 0, :] = False
    m[..., 0, 2] = True
    mask = BlockMask.from_dense(jnp.asarray(m), bq, bk, q_len=T, k_len=S)
    q, k, v, do, dlse = _inputs(7, B, T, S, H, Hkv, D, jnp.bfloat16)
    out = _run_gpu_arrangement(q, k, v, do, dlse, mask, True)
    assert out["pallas"][0].dtype == jnp.bfloat16 and out["pallas"][1].dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in out["pallas"][2:])
    assert np.all(np.asarray(out["pallas"][1])[:, :, :bq] == -np.inf)
    _compare(out, tol=1e-2, metric="rmse")
