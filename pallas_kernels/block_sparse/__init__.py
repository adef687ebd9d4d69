"""Block-sparse flash attention as Pallas kernels, forward and backward (splash-attention style).

`block_sparse_pallas` takes the [B, T, H, D] layout of attention/ops, moves to the kernels'
heads-major layout, pads T and S to whole blocks, flattens the BlockMask arrays for scalar
prefetch and calls `kernels.block_sparse_core` (a `jax.custom_vjp` whose backward is a dq kernel
and a dk / dv kernel). Grid, block shapes and the math are in kernels.py's docstring.

On CPU the kernels run with interpret=True; on TPU they compile through Mosaic (block_q and
block_k multiples of 128 there); on GPU they raise NotImplementedError (the op's impl="auto"
only picks pallas on TPU).
"""
from __future__ import annotations


import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.block_sparse.kernels import Config, block_sparse_core

__all__ = ["block_sparse_pallas", "pallas_supported"]


def pallas_supported(mask, *, interpret: bool | None = None) -> bool:
    """Whether `block_sparse_pallas` can run this mask's block sizes here: any multiple of 8 in
    interpret mode (CPU); on TPU block_q a multiple of 128 and block_k of 8 (128 is what to use
    for speed); never on GPU (no Triton variant yet)."""
    if interpret is None:
        interpret = platform.interpret_default()
    if mask.block_q % 8 or mask.block_k % 8:
        return False
    if interpret:
        return True
    return platform.backend() == "tpu" and mask.block_q % 128 == 0


def block_sparse_pallas(q, k, v, mask, *, causal: bool, scale: float,
                        interpret: bool | None = None):
    """softmax(scale q k^T + M) v restricted to the mask's blocks (and causal if asked).

    q: [B, T, H, D]; k, v: [B, S, H_kv, D] (H a multiple of H_kv; query head h uses kv head
    h // (H // H_kv)); mask: attention.ops.block_sparse.BlockMask with q_len = T, k_len = S and
    batch / head dims 1 or (B, H). interpret: None = automatic (True on CPU).
    Returns o [B, T, H, D] in q's dtype and lse [B, H, T] f32 (-inf, with o = 0, for a row that
    sees no key). Differentiable w.r.t. q, k, v; the lse output may carry a cotangent too."""
    bs, t, hs, d = q.shape
    s = k.shape[1]
    if k.ndim != 4 or v.shape != k.shape or hs % k.shape[2]:
        raise ValueError(f"block_sparse_pallas: q {q.shape}, k {k.shape}, v {v.shape} do not "
                         f"fit [B, T, H, D] / [B, S, H_kv, D] with H a multiple of H_kv")
    mask.check_fits(bs, hs, t, s, "block_sparse_pallas")
    mb, mh = mask.counts.shape[:2]
    bq, bk = mask.block_q, mask.block_k
    if bq % 8 or bk % 8:
        raise ValueError(f"block_sparse_pallas: block_q={bq} and block_k={bk} must be multiples "
                         f"of 8 (of 128 to compile for TPU)")
    if interpret is None:
        interpret = platform.interpret_default()
    if not interpret and bq % 128:
        # Mosaic would reject the [1, block_q] lse row blocks with a less direct message
        raise ValueError(f"block_sparse_pallas: block_q={bq} must be a multiple of 128 to "
                         f"compile for TPU (smaller blocks run only in interpret mode)")
    cfg = Config(scale=float(scale), causal=bool(causal), block_q=bq, block_k=bk, q_len=t,
                 k_len=s, mask_b=mb, mask_h=mh, interpret=bool(interpret))
    tp = mask.num_q_blocks * bq
    sp = mask.num_k_blocks * bk

    def to_kernel_layout(x, length):
        # [B, L, H, D] -> [B, H, Lp, D]; padded queries are sliced off, padded keys masked
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

    flat = lambda a: jnp.asarray(a, jnp.int32).reshape(-1)  # 1-D: SMEM pads each 2-D row
    o, lse = block_sparse_core(to_kernel_layout(q, tp), to_kernel_layout(k, sp),
                               to_kernel_layout(v, sp), flat(mask.counts), flat(mask.indices),
                               flat(mask.t_counts), flat(mask.t_indices), cfg)
    return jnp.transpose(o[:, :, :t], (0, 2, 1, 3)), lse[:, :, 0, :t]
