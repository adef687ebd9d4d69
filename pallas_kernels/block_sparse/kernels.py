"""Pallas kernels of block-sparse flash attention, forward and backward (TPU / Mosaic first).

Layout inside the kernels: heads-major, q / o / dO [B, H, Tp, D], k / v [B, H_kv, Sp, D], with
Tp = NQ * block_q and Sp = NK * block_k (the wrapper pads; keys >= k_len are masked in-kernel,
padded query rows are sliced off and get zero cotangents). A mask block that is not a multiple
of 8 tokens (Landmark's 50, Routing's T / C) sits in a tile rounded up to one, its padding rows
masked (keys) or sliced off (queries), so every block size reaches the TPU kernel. A q / k / v block is
[block_q | block_k, D]: D is the full head dim and block_q / block_k are the sublane dim.

Per-row statistics (lse, and D_r = rowsum(dO * O) - dlse_r) travel as *rows*: [B, H, NQ, 1,
block_q] with blocks (1, block_q) -- both equal the array's last two dims, which makes any block_q
TPU-legal (a [B, H, 1, Tp] row with blocks (1, block_q), the splash-attention layout, needs
block_q a multiple of 128, which HiP's, DHSA's and SSA's 64-token blocks are not). In-kernel
the online-softmax m / l live lane-broadcast in [block_q, 128] VMEM scratch (so the running max
never needs a relayout), and the forward writes lse by transposing that [block_q, 128] tile.

Block sparsity (the BlockMask layouts, flattened to 1-D so SMEM does not pad each row to a
full tile) is scalar-prefetched; the BlockSpec index maps read it, so only active blocks are
DMA'd. Slots past a row's count repeat its last index (BlockMask's padding), so the pipeline
re-uses the block already in VMEM and the body is skipped with `pl.when`.

  forward   grid (B, H, NQ, MK), last axis "arbitrary": for query block i, step j visits key
            block indices[b, h, i, j]; online softmax (m, l, acc in f32 scratch); o and lse are
            written at the last step.
  dq        grid (B, H, NQ, MK), same traversal: p = exp(s - lse) recomputed,
            dS = p * (dP - D_r), dq += scale * dS K.
  dk / dv   grid (B, H, NK, MQ): for key block j, step t visits query block
            t_indices[b, h, j, t]; computed transposed (S^T = K Q^T, [block_k, block_q]) so lse
            and D_r broadcast along lanes as rows; dv += P^T dO, dk += scale * dS^T Q. Per
            *query* head (GQA groups are summed by the caller, in f32).

The lse cotangent: lse_r = log sum_c exp(s_rc) has d lse_r / d s_rc = p_rc, so with dlse it
folds into D_r: dS = p * (dP - (rowsum(dO * O) - dlse)).

Rows that see no key (all blocks in their future under causal, or an all-False row built under
jit) give l = 0: o = 0, lse = -inf. The backward gets lse = +inf for them so p = exp(s - lse) = 0
exactly and every gradient stays finite.

Block sizes (Mosaic; checked by compiling fwd + dq + dk/dv for v5p, v5e, v6e and v4 with libtpu
on CPU, f32 and bf16): any; the kernels' tiles are the mask's blocks rounded up to a multiple of 8
rows (block_q 50, 64, 128 and block_k 50, 64, 128 checked); use multiples of 128 in production so
the S tiles fill the MXU and lanes; D any size (it is the full dim), ideally a multiple of 128.
Interpret mode (the CPU tests) accepts any multiple of 8.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import platform

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
_LANES = 128  # lane width: m / l scratch are lane-broadcast [block_q, 128] tiles


class Config(NamedTuple):
    """Static kernel configuration (hashable: the custom_vjp's nondiff argument)."""
    scale: float
    causal: bool
    block_q: int  # the kernel's tiles: the mask's blocks rounded up to a multiple of 8 rows
    # (TPU) or to a power of two >= 16 (GPU)
    block_k: int
    q_len: int    # T, unpadded
    k_len: int    # S, unpadded: keys >= k_len are masked
    mask_b: int   # Bm: 1 (broadcast) or B
    mask_h: int   # Hm: 1 (broadcast) or H
    interpret: bool
    q_block_len: int = 0  # the mask's block of tokens (0: = block_q); rows past it are padding
    k_block_len: int = 0  # (0: = block_k); keys past it in a tile are padding, masked
    gpu: bool = False  # the GPU arrangement (gpu.py: in-kernel loops over the listed blocks)
    head_dim: int = 0  # D before any padding (GPU: to a power of two), what costs count; 0: D

    @property
    def q_tokens(self) -> int:
        return self.q_block_len or self.block_q

    @property
    def k_tokens(self) -> int:
        return self.k_block_len or self.block_k


# ----------------------------------------------------------------------------- small helpers
def _dot(a, b, contract):
    """f32-accumulating matmul. HIGHEST keeps f32 operands exact (multi-pass on the MXU); for
    bf16 operands Mosaic rejects an fp32 contract precision ("Bad lhs type"), so default there."""
    precision = _HI if a.dtype == _F32 and b.dtype == _F32 else None
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=_F32)


def _mm(a, b):  # a @ b
    return _dot(a, b, ((1,), (0,)))


def _mm_nt(a, b):  # a @ b.T
    return _dot(a, b, ((1,), (1,)))


def _compiler_params(interpret: bool, semantics: tuple[str, ...]):
    if not interpret and platform.is_gpu():
        raise NotImplementedError(
            "block_sparse kernels.py: these are the TPU (Mosaic) kernels, built on TPU scalar "
            "prefetch; on GPU the kernels of block_sparse/gpu.py run (Config.gpu=True, which "
            "block_sparse_pallas picks there)")
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _flat(cfg: Config, b, h, row, n_rows: int, width: int):
    """Flat index of element (b, h, row, 0) of a [Bm, Hm, n_rows, width] array stored 1-D."""
    mb = b if cfg.mask_b > 1 else 0
    mh = h if cfg.mask_h > 1 else 0
    return ((mb * cfg.mask_h + mh) * n_rows + row) * width


def _grid_step(cfg: Config, cnt_ref, idx_ref, n_rows: int, width: int):
    """This grid step (b, h, r, t) of a kernel over rows r (query blocks forward and for dq,
    key blocks for dk/dv): (r, t, how many blocks row r lists, its t-th listed block)."""
    b, h, r, t = (pl.program_id(a) for a in range(4))
    row = _flat(cfg, b, h, r, n_rows, 1)
    return r, t, cnt_ref[row], idx_ref[row * width + t]


def _allowed(cfg: Config, q_block, k_block, shape, transposed: bool):
    """bool [block_q, block_k] (or its transpose): key < k_len, and key <= query if causal."""
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    k_row = lax.broadcasted_iota(jnp.int32, shape, k_axis)
    # positions in the sequence: a tile holds one mask block of q_tokens / k_tokens tokens, then
    # padding rows (block sizes that are not multiples of 8, e.g. Landmark's 50)
    q_pos = q_block * cfg.q_tokens + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = k_block * cfg.k_tokens + k_row
    ok = k_pos < cfg.k_len
    if cfg.k_tokens < cfg.block_k:
        ok = ok & (k_row < cfg.k_tokens)
    if cfg.causal:
        ok = ok & (k_pos <= q_pos)
    return ok


def _block_live(cfg: Config, q_block, k_block):
    """False when causality masks the whole (q_block, k_block) tile: skip its compute."""
    if not cfg.causal:
        return True
    return k_block * cfg.k_tokens <= q_block * cfg.q_tokens + cfg.q_tokens - 1


def dq_step(cfg: Config, q, k, v, do, lse, di, allowed):
    """One (query block, key block) pair's dq / scale: P = exp(S - lse) where allowed,
    dS = P * (dP - D), dS K. lse, di broadcast along the key axis ([bq, 1] columns)."""
    s = _mm_nt(q, k) * cfg.scale                                       # [bq, bk] f32
    p = jnp.where(allowed, jnp.exp(s - lse), 0.0)
    ds = p * (_mm_nt(do.astype(v.dtype), v) - di)
    return _mm(ds.astype(k.dtype), k)


def dkv_step(cfg: Config, q, k, v, do, lse, di, allowed_t):
    """One pair's (dk / scale, dv), computed transposed: S^T = K Q^T [bk, bq], so lse and di
    broadcast along the key axis as [1, bq] rows; dv = P^T dO, dk = dS^T Q."""
    s_t = _mm_nt(k, q) * cfg.scale
    p_t = jnp.where(allowed_t, jnp.exp(s_t - lse), 0.0)                # P^T
    dv = _mm(p_t.astype(do.dtype), do)
    ds_t = p_t * (_mm_nt(v, do.astype(v.dtype)) - di)                  # dS^T
    return _mm(ds_t.astype(q.dtype), q), dv


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(cnt_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                cfg: Config, n_q: int, width: int):
    """One (b, h, i, j) step. Refs: q [bq, D], k / v [bk, D], o [bq, D], lse [1, bq];
    scratch m, l [bq, 128] (lane-broadcast), acc [bq, D], all f32."""
    i, j, count, k_block = _grid_step(cfg, cnt_ref, idx_ref, n_q, width)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full_like(m_scr, -jnp.inf)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(jnp.logical_and(j < count, _block_live(cfg, i, k_block)))
    def _():
        q = q_ref[...]
        k = k_ref[...]
        s = _mm_nt(q, k) * cfg.scale                                   # [bq, bk] f32
        s = jnp.where(_allowed(cfg, i, k_block, s.shape, False), s, -jnp.inf)
        m_prev = m_scr[...]                                            # [bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # A row with nothing allowed yet keeps m = -inf; shift it by 0 instead so that
        # exp(-inf - (-inf)) never makes a NaN (its p and alpha are then exactly 0).
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp(m_prev - m_safe)                               # [bq, 128]
        p = jnp.exp(s - m_safe[:, :1])                                 # masked -> 0
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        v = v_ref[...]
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + _mm(p.astype(v.dtype), v)

    @pl.when(j == width - 1)
    def _():
        l = l_scr[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen[:, :1], acc_scr[...] / l_safe[:, :1], 0.0).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...] + jnp.log(l_safe), -jnp.inf)  # [bq, 128], lanes equal
        # [bq, 128] -> [128, bq] is an aligned 32-bit transpose; row 0 is the lane-dense lse row
        lse_ref[...] = lse.T[:1, :]


def _cost(grid, cfg: Config, d: int, matmuls: int, arrays) -> pl.CostEstimate:
    """XLA's view of a kernel (it cannot see inside a Mosaic or Triton call; the dry run's FLOPs
    and step time, and MFU, use this): `matmuls` products of a mask block's tokens [q_tokens x
    k_tokens x D] (not the tiles' padding rows nor a padded head dim) and one exp per score
    for every slot of the grid (an upper bound: slots past a row's count repeat a block and
    skip it)."""
    pairs = math.prod(grid)
    return pl.CostEstimate(
        flops=2 * matmuls * pairs * cfg.q_tokens * cfg.k_tokens * (cfg.head_dim or d),
        transcendentals=pairs * cfg.q_tokens * cfg.k_tokens,
        bytes_accessed=sum(a.size * a.dtype.itemsize for a in arrays))


def _seq_block(bs: int, d: int, index_map):
    return pl.BlockSpec((None, None, bs, d), index_map)


def _row_block(bs: int, index_map):
    """A [1, block_q] row of a [B, H, NQ, 1, block_q] statistic (lse, D)."""
    return pl.BlockSpec((None, None, None, 1, bs), index_map)


def _forward_layout(q, k, indices, cfg: Config):
    """Grid (B, H, NQ, MK) and the index maps of the kernels that walk the forward layout (the
    forward and dq): query-side blocks by (b, h, i), key/value blocks by the scalar-prefetched
    index of slot j (kv head h // rep), per-row [1, block_q] vectors (lse, D) by (b, h, i)."""
    bs, hs, tp, _ = q.shape
    rep = hs // k.shape[1]
    n_q = tp // cfg.block_q
    width = indices.shape[0] // (cfg.mask_b * cfg.mask_h * n_q)

    def q_map(b, h, i, j, cnt_ref, idx_ref):
        return b, h, i, 0

    def kv_map(b, h, i, j, cnt_ref, idx_ref):
        return b, h // rep, idx_ref[_flat(cfg, b, h, i, n_q, width) + j], 0

    def row_map(b, h, i, j, cnt_ref, idx_ref):
        return b, h, i, 0, 0

    return (bs, hs, n_q, width), q_map, kv_map, row_map


def _sparse_call(kernel, cfg: Config, *, grid, in_specs, out_specs, scratch_shapes, out_shape,
                 name: str, cost):
    """pl.pallas_call of one of the three kernels: the two mask arrays scalar-prefetched, the
    last grid axis (the listed blocks of a row) sequential, the others parallel."""
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch_shapes)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=_compiler_params(cfg.interpret, ("parallel",) * 3 + ("arbitrary",)),
        interpret=cfg.interpret, name=name, cost_estimate=cost)


def forward(q, k, v, counts, indices, cfg: Config):
    """q [B, H, Tp, D]; k, v [B, H_kv, Sp, D]; counts int32 [Bm*Hm*NQ], indices int32
    [Bm*Hm*NQ*MK] (flattened BlockMask forward layout).
    Returns o [B, H, Tp, D] (q's dtype) and lse [B, H, NQ, 1, block_q] f32."""
    d = q.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    grid, q_map, kv_map, lse_map = _forward_layout(q, k, indices, cfg)

    return _sparse_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_q=grid[2], width=grid[3]), cfg, grid=grid,
        in_specs=[_seq_block(bq, d, q_map), _seq_block(bk, d, kv_map), _seq_block(bk, d, kv_map)],
        out_specs=[_seq_block(bq, d, q_map), _row_block(bq, lse_map)],
        scratch_shapes=[pltpu.VMEM((bq, _LANES), _F32), pltpu.VMEM((bq, _LANES), _F32),
                        pltpu.VMEM((bq, d), _F32)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((*q.shape[:2], grid[2], 1, bq), _F32)],
        name="block_sparse_fwd", cost=_cost(grid, cfg, d, 2, (q, k, v, q)),
    )(counts, indices, q, k, v)


# ----------------------------------------------------------------------------- backward: dq
def _dq_kernel(cnt_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_scr, *,
               cfg: Config, n_q: int, width: int):
    """One (b, h, i, j) step. Refs: q, do [bq, D]; k, v [bk, D]; lse, di [1, bq] rows (lse = +inf
    for rows that see nothing); dq [bq, D]; scratch dq [bq, D] f32."""
    i, j, count, k_block = _grid_step(cfg, cnt_ref, idx_ref, n_q, width)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    @pl.when(jnp.logical_and(j < count, _block_live(cfg, i, k_block)))
    def _():
        lse = jnp.expand_dims(lse_ref[0], -1)                          # [bq, 1]
        di = jnp.expand_dims(di_ref[0], -1)
        dq_scr[...] += dq_step(cfg, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse, di,
                               _allowed(cfg, i, k_block, (cfg.block_q, cfg.block_k), False))

    @pl.when(j == width - 1)
    def _():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, di, counts, indices, cfg: Config):
    """dq [B, H, Tp, D] in q's dtype. lse, di: [B, H, NQ, 1, block_q] f32 (module docstring)."""
    d = q.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    grid, q_map, kv_map, row_map = _forward_layout(q, k, indices, cfg)

    return _sparse_call(
        functools.partial(_dq_kernel, cfg=cfg, n_q=grid[2], width=grid[3]), cfg, grid=grid,
        in_specs=[_seq_block(bq, d, q_map), _seq_block(bk, d, kv_map), _seq_block(bk, d, kv_map),
                  _seq_block(bq, d, q_map), _row_block(bq, row_map), _row_block(bq, row_map)],
        out_specs=_seq_block(bq, d, q_map), scratch_shapes=[pltpu.VMEM((bq, d), _F32)],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="block_sparse_bwd_dq", cost=_cost(grid, cfg, d, 3, (q, k, v, do, q)),
    )(counts, indices, q, k, v, do, lse, di)


# ----------------------------------------------------------------------------- backward: dk, dv
def _dkv_kernel(cnt_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, cfg: Config, n_k: int, width: int):
    """One (b, h, j, t) step for key block j and its t-th query block. Refs: q, do [bq, D];
    k, v [bk, D]; lse, di [1, bq] rows; dk, dv [bk, D]; scratch dk, dv [bk, D] f32."""
    j, t, count, q_block = _grid_step(cfg, cnt_ref, idx_ref, n_k, width)

    @pl.when(t == 0)
    def _():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when(jnp.logical_and(t < count, _block_live(cfg, q_block, j)))
    def _():
        # lse / di are rows [1, bq]: they broadcast along sublanes of the transposed tile
        dk, dv = dkv_step(cfg, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...],
                          di_ref[...], _allowed(cfg, q_block, j, (cfg.block_k, cfg.block_q), True))
        dk_scr[...] += dk
        dv_scr[...] += dv

    @pl.when(t == width - 1)
    def _():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, di, t_counts, t_indices, cfg: Config, dk_dtype, dv_dtype):
    """dk, dv per *query* head: [B, H, Sp, D] in dk_dtype / dv_dtype (the caller sums GQA groups).
    t_counts int32 [Bm*Hm*NK], t_indices int32 [Bm*Hm*NK*MQ] (flattened transposed layout)."""
    bs, hs, tp, d = q.shape
    sp = k.shape[2]
    rep = hs // k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    n_k = sp // bk
    width = t_indices.shape[0] // (cfg.mask_b * cfg.mask_h * n_k)

    def q_map(b, h, j, t, cnt_ref, idx_ref):
        return b, h, idx_ref[_flat(cfg, b, h, j, n_k, width) + t], 0

    def row_map(b, h, j, t, cnt_ref, idx_ref):
        return b, h, idx_ref[_flat(cfg, b, h, j, n_k, width) + t], 0, 0

    def kv_map(b, h, j, t, cnt_ref, idx_ref):
        return b, h // rep, j, 0

    def out_map(b, h, j, t, cnt_ref, idx_ref):
        return b, h, j, 0

    shape, grid = (bs, hs, sp, d), (bs, hs, n_k, width)
    return _sparse_call(
        functools.partial(_dkv_kernel, cfg=cfg, n_k=n_k, width=width), cfg, grid=grid,
        in_specs=[_seq_block(bq, d, q_map), _seq_block(bk, d, kv_map), _seq_block(bk, d, kv_map),
                  _seq_block(bq, d, q_map), _row_block(bq, row_map), _row_block(bq, row_map)],
        out_specs=[_seq_block(bk, d, out_map), _seq_block(bk, d, out_map)],
        scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
        out_shape=[jax.ShapeDtypeStruct(shape, dk_dtype), jax.ShapeDtypeStruct(shape, dv_dtype)],
        name="block_sparse_bwd_dkv", cost=_cost(grid, cfg, d, 4, (q, k, v, do, k, v)),
    )(t_counts, t_indices, q, k, v, do, lse, di)
