"""Block-sparse flash attention kernels for GPU (Pallas's Triton lowering), forward and backward.

The same math and layouts as kernels.py (its docstring), arranged for a GPU: there is no scalar
prefetch and no sequential grid axis, so each program owns one row of the mask (a query block
forward and for dq, a key block for dk / dv) and *loops inside the kernel* over the blocks that
row lists, reading each block index from the flattened BlockMask in GPU memory and loading that
block of K / V (or Q / dO) at a data-dependent offset. The loop runs `count` times, so a row's
cost is its active blocks, never the padded width.

  forward   grid (B, H, NQ): online softmax over indices[b, h, i, :counts[b, h, i]].
  dq        grid (B, H, NQ): the same traversal, dq += scale * (P * (dP - D)) K.
  dk / dv   grid (B, H, NK): over t_indices[b, h, j, :t_counts[b, h, j]] (per query head; the
            caller sums GQA groups), computed transposed as in kernels.py.

Triton's tensors and dot shapes need power-of-two dims >= 16: the wrapper rounds each mask block
up to such a tile (padding keys masked, padding queries sliced off, as for the TPU's 8-row tiles)
and zero-pads the head dim (zero key dims add nothing to q k^T, zero value dims give zero outputs
that are sliced off); blocks of more than 128 tokens (Routing's T / C) are first split into equal
sub-blocks, so a program's [block_q, block_k] scores and [block, D] accumulators stay in
registers. Under causal masking a listed block wholly in a row's future is skipped (lax.cond). The per-row statistics (lse, D) are [B, H, Tp] rows here (the TPU's
[B, H, NQ, 1, block_q] tiles hold the same values in the same order).

On CPU these run in interpret mode (the tests); on a GPU they compile through Triton. The state
of that lowering (deprecated upstream in favour of Mosaic GPU) and why it is used: README,
"GPU kernels".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_sparse.kernels import (Config, _allowed, _block_live, _cost, _flat,
                                                 _mm, _mm_nt, dkv_step, dq_step)

_F32 = jnp.float32


def _compiler_params(cfg: Config, d: int):
    """Triton's launch: 8 warps once a program's f32 accumulator ([block, D]) passes 64 x 128, so
    it stays in registers (a heuristic no GPU has timed yet; bench/gpu.py is where to tune it)."""
    if cfg.interpret:
        return None
    warps = 4 if max(cfg.block_q, cfg.block_k) * d <= 64 * 128 else 8
    return pltr.CompilerParams(num_warps=warps, num_stages=2)


def _whole(shape, index_map):
    """A block covering the whole trailing `shape` (one batch and head)."""
    return pl.BlockSpec((None, None, *shape), index_map)


def _flat_spec(a):
    """A flattened mask array, whole, read by scalar loads."""
    return pl.BlockSpec(a.shape, lambda *_: (0,))


def _call(kernel, cfg: Config, d: int, *, grid, in_specs, out_specs, out_shape, name, cost):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=_compiler_params(cfg, d),
                          interpret=cfg.interpret, name=name, cost_estimate=cost)


def _if_live(live, visit, carry):
    """visit(carry) for a (query block, key block) pair causality leaves anything of, else the
    carry unchanged (a listed block wholly in the future costs a comparison, not two matmuls)."""
    if live is True:  # not causal
        return visit(carry)
    return lax.cond(live, visit, lambda c: c, carry)


def _row(cfg: Config, cnt_ref, n_rows: int):
    """This program's (b, h, mask row r, the flat index of row r, how many blocks it lists)."""
    b, h, r = (pl.program_id(a) for a in range(3))
    flat = _flat(cfg, b, h, r, n_rows, 1)
    return r, flat, cnt_ref[flat]


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(cnt_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: Config,
                n_q: int, width: int):
    """Program (b, h, i). Refs: q, o [bq, D]; k, v [Sp, D] (this batch's kv head, whole);
    lse [bq]."""
    i, row, count = _row(cfg, cnt_ref, n_q)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]

    def slot(j, carry):
        k_block = idx_ref[row * width + j]
        keys = pl.ds(pl.multiple_of(k_block * bk, bk), bk)

        def visit(carry):
            m_prev, l_prev, acc = carry
            s = _mm_nt(q, k_ref[keys, :]) * cfg.scale                  # [bq, bk] f32
            s = jnp.where(_allowed(cfg, i, k_block, (bq, bk), False), s, -jnp.inf)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # no NaN from -inf - (-inf)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, None])
            v = v_ref[keys, :]
            return (m_next, alpha * l_prev + jnp.sum(p, axis=1),
                    alpha[:, None] * acc + _mm(p.astype(v.dtype), v))
        return _if_live(_block_live(cfg, i, k_block), visit, carry)

    m, l, acc = lax.fori_loop(0, count, slot, (jnp.full((bq,), -jnp.inf, _F32),
                                                jnp.zeros((bq,), _F32),
                                                jnp.zeros((bq, q.shape[-1]), _F32)))
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _layout(q, k, flat_indices, cfg: Config, n_rows: int):
    """(grid (B, H, n_rows), the mask row's width, the kv head of query head h)."""
    bs, hs = q.shape[:2]
    rep = hs // k.shape[1]
    width = flat_indices.shape[0] // (cfg.mask_b * cfg.mask_h * n_rows)
    return (bs, hs, n_rows), width, rep


def _query_rows(q, k, counts, indices, cfg: Config):
    """What the two kernels over query blocks (forward, dq) share: (grid (B, H, NQ), the mask
    row width, the specs of counts, indices, a q-side [bq, D] block, k / v whole for kv head
    h // rep, and a [bq] row of lse / D)."""
    tp, d = q.shape[2:]
    bq = cfg.block_q
    grid, width, rep = _layout(q, k, indices, cfg, tp // bq)
    kv = _whole((k.shape[2], d), lambda b, h, i: (b, h // rep, 0, 0))
    return (grid, width, _flat_spec(counts), _flat_spec(indices),
            _whole((bq, d), lambda b, h, i: (b, h, i, 0)), kv,
            _whole((bq,), lambda b, h, i: (b, h, i)))


def forward(q, k, v, counts, indices, cfg: Config):
    """kernels.forward's contract; lse comes back as [B, H, Tp] f32."""
    d = q.shape[-1]
    grid, width, cnt, idx, q_side, kv, row = _query_rows(q, k, counts, indices, cfg)
    return _call(
        functools.partial(_fwd_kernel, cfg=cfg, n_q=grid[2], width=width), cfg, d, grid=grid,
        in_specs=[cnt, idx, q_side, kv, kv], out_specs=[q_side, row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(q.shape[:3], _F32)],
        name="block_sparse_fwd_gpu", cost=_cost((*grid, width), cfg, d, 2, (q, k, v, q)),
    )(counts, indices, q, k, v)


# ----------------------------------------------------------------------------- backward: dq
def _dq_kernel(cnt_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *,
               cfg: Config, n_q: int, width: int):
    """Program (b, h, i). Refs: q, do, dq [bq, D]; k, v [Sp, D] whole; lse, di [bq]."""
    i, row, count = _row(cfg, cnt_ref, n_q)
    bq, bk = cfg.block_q, cfg.block_k
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...][:, None], di_ref[...][:, None]

    def slot(j, dq):
        k_block = idx_ref[row * width + j]
        keys = pl.ds(pl.multiple_of(k_block * bk, bk), bk)
        return _if_live(_block_live(cfg, i, k_block), lambda dq: dq + dq_step(
            cfg, q, k_ref[keys, :], v_ref[keys, :], do, lse, di,
            _allowed(cfg, i, k_block, (bq, bk), False)), dq)

    dq = lax.fori_loop(0, count, slot, jnp.zeros(q.shape, _F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, di, counts, indices, cfg: Config):
    """kernels.backward_dq's contract with lse, di as [B, H, Tp] rows."""
    d = q.shape[-1]
    grid, width, cnt, idx, q_side, kv, row = _query_rows(q, k, counts, indices, cfg)
    return _call(
        functools.partial(_dq_kernel, cfg=cfg, n_q=grid[2], width=width), cfg, d, grid=grid,
        in_specs=[cnt, idx, q_side, kv, kv, q_side, row, row],
        out_specs=q_side, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="block_sparse_bwd_dq_gpu", cost=_cost((*grid, width), cfg, d, 3, (q, k, v, do, q)),
    )(counts, indices, q, k, v, do, lse, di)


# ----------------------------------------------------------------------------- backward: dk, dv
def _dkv_kernel(cnt_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                *, cfg: Config, n_k: int, width: int):
    """Program (b, h, j) for key block j. Refs: q, do [Tp, D] and lse, di [Tp] whole (this
    query head); k, v, dk, dv [bk, D]."""
    j, row, count = _row(cfg, cnt_ref, n_k)
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]

    def slot(t, carry):
        q_block = idx_ref[row * width + t]
        rows = pl.ds(pl.multiple_of(q_block * bq, bq), bq)

        def visit(carry):
            dk, dv = carry
            dk_t, dv_t = dkv_step(cfg, q_ref[rows, :], k, v, do_ref[rows, :],
                                  lse_ref[rows][None, :], di_ref[rows][None, :],
                                  _allowed(cfg, q_block, j, (bk, bq), True))
            return dk + dk_t, dv + dv_t
        return _if_live(_block_live(cfg, q_block, j), visit, carry)

    zeros = jnp.zeros(k.shape, _F32)
    dk, dv = lax.fori_loop(0, count, slot, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, di, t_counts, t_indices, cfg: Config, dk_dtype, dv_dtype):
    """kernels.backward_dkv's contract with lse, di as [B, H, Tp] rows."""
    bs, hs, tp, d = q.shape
    sp = k.shape[2]
    bk = cfg.block_k
    grid, width, rep = _layout(q, k, t_indices, cfg, sp // bk)
    whole_q = lambda b, h, j: (b, h, 0, 0)  # noqa: E731
    kv_map = lambda b, h, j: (b, h // rep, j, 0)  # noqa: E731
    out_map = lambda b, h, j: (b, h, j, 0)  # noqa: E731
    whole_row = lambda b, h, j: (b, h, 0)  # noqa: E731
    shape = (bs, hs, sp, d)
    return _call(
        functools.partial(_dkv_kernel, cfg=cfg, n_k=grid[2], width=width), cfg, d, grid=grid,
        in_specs=[_flat_spec(t_counts), _flat_spec(t_indices), _whole((tp, d), whole_q),
                  _whole((bk, d), kv_map), _whole((bk, d), kv_map), _whole((tp, d), whole_q),
                  _whole((tp,), whole_row), _whole((tp,), whole_row)],
        out_specs=[_whole((bk, d), out_map), _whole((bk, d), out_map)],
        out_shape=[jax.ShapeDtypeStruct(shape, dk_dtype), jax.ShapeDtypeStruct(shape, dv_dtype)],
        name="block_sparse_bwd_dkv_gpu",
        cost=_cost((*grid, width), cfg, d, 4, (q, k, v, do, k, v)),
    )(t_counts, t_indices, q, k, v, do, lse, di)
