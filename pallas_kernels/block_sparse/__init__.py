"""Block-sparse flash attention as Pallas kernels, forward and backward (splash-attention style).

`block_sparse_pallas` takes the [B, T, H, D] layout of attention/ops, moves to the kernels'
heads-major layout, pads T and S to whole blocks, flattens the BlockMask arrays (TPU: for scalar
prefetch) and calls `core.block_sparse_core` (a `jax.custom_vjp` whose backward is a dq kernel
and a dk / dv kernel). Grid, block shapes and the math are in kernels.py's docstring.

On CPU the kernels run with interpret=True; on TPU they compile through Mosaic (any block sizes:
blocks that are not multiples of 8 tokens sit in tiles padded to one; 128 fills the MXU); on GPU
the arrangement of gpu.py runs (Triton: in-kernel loops over each row's listed blocks, tiles and
head dim padded to powers of two >= 16, blocks over 128 tokens split into equal sub-blocks so a
program's tiles stay in registers); `gpu=True` runs that arrangement in interpret mode.
"""
from __future__ import annotations

import dataclasses


import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.block_sparse.core import block_sparse_core
from pallas_kernels.block_sparse.kernels import Config

__all__ = ["block_sparse_pallas", "pallas_supported"]


def pallas_supported(mask, *, interpret: bool | None = None) -> bool:
    """Whether `block_sparse_pallas` can run here: in interpret mode (CPU), on TPU or on a GPU,
    any block sizes (multiples of 128 fill the MXU; others sit in padded tiles)."""
    if interpret is None:
        interpret = platform.interpret_default()
    return interpret or platform.backend() == "tpu" or platform.is_gpu()


def _pow2_tile(n: int) -> int:
    """Triton's smallest legal tile holding n rows: a power of two >= 16."""
    return max(16, 1 << (n - 1).bit_length())


GPU_MAX_BLOCK = 128  # tokens per block in a GPU program (larger mask blocks are split)


def _split_factor(block: int, cap: int) -> int:
    """The fewest equal parts of `block` tokens with at most `cap` tokens each."""
    return next(r for r in range(-(-block // cap), block + 1) if block % r == 0)


def _expand_rows(counts, indices, per_row: int, per_col: int, n_rows: int, n_cols: int):
    """One layout of a BlockMask (counts [Bm, Hm, N], indices [Bm, Hm, N, M]) with every row
    block split into `per_row` and every column block into `per_col` sub-blocks: row i -> rows
    i * per_row + a, listed column j -> columns j * per_col + b. Sub-blocks past the sequence
    (n_rows, n_cols; only the last block's) are dropped: they come last in a row's ascending
    list, so the new counts cover a prefix; the padding slots after it stay in range."""
    m = indices.shape[-1]
    cols = indices[..., None] * per_col + jnp.arange(per_col)                # [.., N, M, c]
    listed = jnp.arange(m)[:, None] < counts[..., None, None]
    new_counts = jnp.sum(listed & (cols < n_cols), axis=(-2, -1)).astype(jnp.int32)
    cols = jnp.minimum(cols, n_cols - 1).reshape(*indices.shape[:3], m * per_col)
    rows = lambda x: jnp.repeat(x, per_row, axis=2)[:, :, :n_rows]  # noqa: E731
    return rows(new_counts), rows(cols.astype(jnp.int32))


def split_blocks(mask, max_block: int = GPU_MAX_BLOCK):
    """The same mask over blocks of at most `max_block` tokens (each block split into equal
    sub-blocks: the smallest such split), both layouts; the mask itself where none is larger."""
    r, c = _split_factor(mask.block_q, max_block), _split_factor(mask.block_k, max_block)
    if r == c == 1:
        return mask
    bq, bk = mask.block_q // r, mask.block_k // c
    nq, nk = -(-mask.q_len // bq), -(-mask.k_len // bk)
    counts, indices = _expand_rows(mask.counts, mask.indices, r, c, nq, nk)
    t_counts, t_indices = _expand_rows(mask.t_counts, mask.t_indices, c, r, nk, nq)
    return dataclasses.replace(mask, counts=counts, indices=indices, t_counts=t_counts,
                               t_indices=t_indices, block_q=bq, block_k=bk)


def block_sparse_pallas(q, k, v, mask, *, causal: bool, scale: float,
                        interpret: bool | None = None, gpu: bool | None = None):
    """softmax(scale q k^T + M) v restricted to the mask's blocks (and causal if asked).

    q: [B, T, H, D]; k, v: [B, S, H_kv, D] (H a multiple of H_kv; query head h uses kv head
    h // (H // H_kv)); mask: attention.ops.block_sparse.BlockMask with q_len = T, k_len = S and
    batch / head dims 1 or (B, H). interpret: None = automatic (True on CPU). gpu: the GPU
    arrangement (None: on a GPU backend; the tests run it in interpret mode on CPU).
    Returns o [B, T, H, D] in q's dtype and lse [B, H, T] f32 (-inf, with o = 0, for a row that
    sees no key). Differentiable w.r.t. q, k, v; the lse output may carry a cotangent too."""
    bs, t, hs, d = q.shape
    s = k.shape[1]
    if k.ndim != 4 or v.shape != k.shape or hs % k.shape[2]:
        raise ValueError(f"block_sparse_pallas: q {q.shape}, k {k.shape}, v {v.shape} do not "
                         f"fit [B, T, H, D] / [B, S, H_kv, D] with H a multiple of H_kv")
    mask.check_fits(bs, hs, t, s, "block_sparse_pallas")
    if interpret is None:
        interpret = platform.interpret_default()
    if gpu is None:
        gpu = not interpret and platform.is_gpu()
    if gpu:
        mask = split_blocks(mask)
    mb, mh = mask.counts.shape[:2]
    bq, bk = mask.block_q, mask.block_k
    d_kernel = _pow2_tile(d) if gpu else d
    if d_kernel != d:
        # zero key dims add nothing to q k^T; zero value dims give zero outputs: exact
        q, k, v = (jnp.pad(x, [(0, 0)] * 3 + [(0, d_kernel - d)]) for x in (q, k, v))
    # the kernels' tiles, each holding one mask block: whole multiples of 8 rows (the TPU's
    # sublanes), or powers of two >= 16 (Triton's tensor and dot shapes)
    tile_q, tile_k = ((_pow2_tile(bq), _pow2_tile(bk)) if gpu else
                      (-(-bq // 8) * 8, -(-bk // 8) * 8))
    cfg = Config(scale=float(scale), causal=bool(causal), block_q=tile_q, block_k=tile_k,
                 q_len=t, k_len=s, mask_b=mb, mask_h=mh, interpret=bool(interpret),
                 q_block_len=bq if bq != tile_q else 0, k_block_len=bk if bk != tile_k else 0,
                 gpu=bool(gpu), head_dim=d)
    nq, nk = mask.num_q_blocks, mask.num_k_blocks

    def to_kernel_layout(x, n, block, tile):
        # [B, L, H, D] -> [B, H, n * tile, D]: L padded to n blocks, each block to a tile (padded
        # queries are sliced off, padded keys masked in-kernel)
        x = jnp.transpose(x, (0, 2, 1, 3))
        x = jnp.pad(x, ((0, 0), (0, 0), (0, n * block - x.shape[2]), (0, 0)))
        if tile == block:
            return x
        x = x.reshape(*x.shape[:2], n, block, x.shape[-1])
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, tile - block), (0, 0)))
        return x.reshape(*x.shape[:2], n * tile, x.shape[-1])

    # 1-D: SMEM pads each 2-D row (TPU scalar prefetch); the GPU kernels read them from memory
    flat = lambda a: jnp.asarray(a, jnp.int32).reshape(-1)  # noqa: E731
    o, lse = block_sparse_core(to_kernel_layout(q, nq, bq, tile_q),
                               to_kernel_layout(k, nk, bk, tile_k),
                               to_kernel_layout(v, nk, bk, tile_k), flat(mask.counts),
                               flat(mask.indices), flat(mask.t_counts), flat(mask.t_indices), cfg)
    o = o.reshape(bs, hs, nq, tile_q, d_kernel)[:, :, :, :bq, :d].reshape(bs, hs, nq * bq, d)
    lse = lse.reshape(bs, hs, nq, tile_q)[:, :, :, :bq].reshape(bs, hs, nq * bq)
    return jnp.transpose(o[:, :, :t], (0, 2, 1, 3)), lse[:, :, :t]
