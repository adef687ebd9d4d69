"""The block-sparse attention core: a `jax.custom_vjp` over the kernels of either arrangement
(kernels.py: TPU / Mosaic, scalar-prefetched block indices over a sequential grid axis; gpu.py:
Triton, in-kernel loops over each row's listed blocks), chosen by `Config.gpu`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import gpu
from pallas_kernels.block_sparse import kernels as tpu
from pallas_kernels.block_sparse.kernels import Config

_F32 = jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def block_sparse_core(q, k, v, counts, indices, t_counts, t_indices, cfg: Config):
    """Kernel-layout block-sparse attention. q [B, H, Tp, D]; k, v [B, H_kv, Sp, D] (padded to
    whole blocks); the four mask arrays flattened to 1-D int32. Returns o [B, H, Tp, D] in q's
    dtype and lse f32 ([B, H, NQ, 1, block_q] from the TPU kernels, [B, H, Tp] from the GPU ones:
    the same values in the same order); differentiable w.r.t. q, k, v (and takes an lse
    cotangent)."""
    return _kernels(cfg)[0](q, k, v, counts, indices, cfg)


def _kernels(cfg: Config):
    """(forward, backward_dq, backward_dkv) of the arrangement cfg asks for."""
    if cfg.gpu:
        return gpu.forward, gpu.backward_dq, gpu.backward_dkv
    return tpu.forward, tpu.backward_dq, tpu.backward_dkv


def _core_fwd(q, k, v, counts, indices, t_counts, t_indices, cfg):
    o, lse = _kernels(cfg)[0](q, k, v, counts, indices, cfg)
    return (o, lse), (q, k, v, o, lse, counts, indices, t_counts, t_indices)


def _core_bwd(cfg, res, cotangents):
    q, k, v, o, lse, counts, indices, t_counts, t_indices = res
    do, dlse = cotangents
    bs, hs, tp, d = q.shape
    hkv = k.shape[1]
    rep = hs // hkv
    # D_r = rowsum(dO * O) - dlse_r (the lse cotangent folded in, see kernels.py's docstring)
    di = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1).reshape(lse.shape) - dlse
    # rows that saw no key: lse = +inf makes p = exp(s - lse) exactly 0 in both kernels
    lse_b = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    _, dq_kernel, dkv_kernel = _kernels(cfg)
    dq = dq_kernel(q, k, v, do, lse_b, di, counts, indices, cfg)
    # GQA: per-query-head partials in f32, summed over each group's `rep` heads here
    dk_dtype, dv_dtype = (k.dtype, v.dtype) if rep == 1 else (_F32, _F32)
    dk, dv = dkv_kernel(q, k, v, do, lse_b, di, t_counts, t_indices, cfg, dk_dtype, dv_dtype)
    if rep > 1:
        sp = k.shape[2]
        dk = dk.reshape(bs, hkv, rep, sp, d).sum(2).astype(k.dtype)
        dv = dv.reshape(bs, hkv, rep, sp, d).sum(2).astype(v.dtype)
    return dq, dk, dv, None, None, None, None


block_sparse_core.defvjp(_core_fwd, _core_bwd)
