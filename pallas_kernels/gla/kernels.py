"""Pallas kernels of chunkwise gated linear attention (GLA), forward and backward.

Layout inside the kernels: [B, H, T, D] with T a multiple of the chunk C, so a block is
[1, 1, C, D] (last two dims: chunk, full head dim) and a state block is [1, 1, 1, V, K].
States are kept *transposed*, S^T: [V, K], so that the per-key-dim decay diag(e^g) S becomes a
row (lane) broadcast `S^T * e^g[None, :]`, and every matmul is `a @ b`, `a @ b.T` or `a.T @ b`.

Per chunk, with b = within-chunk cumulative sum of log_g (b_C its last row), Q already scaled:
  state   S_[i+1] = diag(e^{b_C}) S_[i] + (K * e^{b_C - b})^T V
  output  O = (Q * e^b) S_[i] + (A ⊙ M) V,   A_rs = sum_d q_rd k_sd e^{b_rd - b_sd}, M: r >= s.
Every exponent is kept <= 0 (strong decay, log_g ~ -7 a step, would overflow e^{-b}) by
secondary chunking into sub-chunks of `sub` rows, one grid step looping over them:
- a query sub-chunk meets the keys of earlier sub-chunks through a matmul rebased on its first row
  r0: q factors e^{b_r - b_r0} and k factors e^{b_r0 - b_s}, both <= 1 (the block's other keys
  would get positive exponents: those are clamped to 0, so they stay finite, and masked out);
- in the backward a key sub-chunk meets the queries of later sub-chunks the same way, rebased on
  its last row;
- a diagonal sub-block is computed element-wise in log space, one key column at a time.

Backward (dO given; dS_[N] = cotangent of the final state):
  dS_[i] = diag(e^{b_C}) dS_[i+1] + (Q * e^b)^T dO                   (reverse over chunks)
  dQ = e^b ⊙ (dO S_[i]^T) + [dA K-part],  dA = (dO V^T) ⊙ M
  dK = e^{b_C - b} ⊙ (V dS_[i+1]^T) + [dA^T Q-part]
  dV = (A ⊙ M)^T dO + (K * e^{b_C - b}) dS_[i+1]
and d log_g follows from the GLA identity (see `gla_core`'s backward), so the kernel only emits
q ⊙ dq - k ⊙ dk per position.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

from pallas_kernels import platform

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


class Config(NamedTuple):
    scale: float
    chunk: int
    sub: int
    interpret: bool
    # "kernel": the chunk-state recurrence (forward and reverse) as Pallas kernels carrying the
    # state over a sequential grid axis (TPU); "loop": as kernels looping over the chunks inside
    # one program per (batch, head, value block) (GPU, whose lowering has no sequential grid axis)
    state_pass: str = "kernel"
    dims: tuple = ()  # (K, V) before any padding (GPU: to powers of two), what costs count


# ----------------------------------------------------------------------------- small helpers
def _dot(a, b, contract):
    return lax.dot_general(a, b, (contract, ((), ())), precision=_HI, preferred_element_type=_F32)


def _mm(a, b):  # a @ b
    return _dot(a, b, ((1,), (0,)))


def _mm_nt(a, b):  # a @ b.T
    return _dot(a, b, ((1,), (1,)))


def _mm_tn(a, b):  # a.T @ b
    return _dot(a, b, ((0,), (0,)))


def _compiler_params(interpret: bool, semantics: tuple[str, ...]):
    if not interpret and platform.is_gpu():
        if "arbitrary" in semantics:
            raise NotImplementedError(
                "gla_pallas: this kernel carries the chunk state across a sequential grid axis, "
                "which the Mosaic TPU lowering (and interpret mode) supports but the GPU lowering "
                "does not; on GPU the state pass loops over the chunks inside the kernel "
                "(Config.state_pass='loop', which gla_pallas picks there)")
        return pltr.CompilerParams(num_warps=4, num_stages=2)  # Triton
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _row(x, r: int):
    """x[r:r + 1] of a value, as a masked sublane sum: lowers everywhere (the Triton lowering has
    no value slicing)."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == r, x, 0.0), axis=0, keepdims=True)


def _diag_block_forward(q, k, b):
    """A [c, c]: A_rj = sum_d q_rd k_jd e^{b_rd - b_jd} for r >= j, else 0 (all in f32).

    One key column j at a time, exponents min(b_r - b_j, 0) <= 0 (rows r < j are masked).
    Row j is picked with a masked sublane sum, which lowers everywhere (no dynamic slicing).
    """
    c, kd = q.shape
    sub_rows = lax.broadcasted_iota(jnp.int32, (c, kd), 0)
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def body(j, a):
        pick = sub_rows == j
        k_j = jnp.sum(jnp.where(pick, k, 0.0), axis=0, keepdims=True)
        b_j = jnp.sum(jnp.where(pick, b, 0.0), axis=0, keepdims=True)
        a_col = jnp.sum(q * k_j * jnp.exp(jnp.minimum(b - b_j, 0.0)), axis=1, keepdims=True)
        return a + jnp.where(col == j, a_col, 0.0)

    a = lax.fori_loop(0, c, body, jnp.zeros((c, c), _F32))
    return jnp.where(row >= col, a, 0.0)


def _diag_block_backward(q, k, v, do, b):
    """Gradients of the diagonal sub-block O = (A ⊙ M) V (q already scaled).

    Returns dq and dk *without* the r = s terms, dv, and dA_rr = do_r · v_r: the r = s terms,
    dA_rr k_r and dA_rr q_r, are added by the caller after it forms q ⊙ dq - k ⊙ dk, in which
    they cancel exactly (under strong decay they are nearly all of dq and dk, and forming the
    difference with them in it would lose d log_g's digits).
    """
    c, kd = q.shape
    vd = v.shape[1]
    sub_k = lax.broadcasted_iota(jnp.int32, (c, kd), 0)
    sub_v = lax.broadcasted_iota(jnp.int32, (c, vd), 0)
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    d_a = jnp.where(row > col, _mm_nt(do, v), 0.0)  # dA = (dO V^T) ⊙ M, strictly below

    def body(j, carry):
        dq, dk, dv = carry
        pick = sub_k == j
        k_j = jnp.sum(jnp.where(pick, k, 0.0), axis=0, keepdims=True)
        b_j = jnp.sum(jnp.where(pick, b, 0.0), axis=0, keepdims=True)
        e = jnp.where(sub_k >= j, jnp.exp(jnp.minimum(b - b_j, 0.0)), 0.0)  # e^{b_r - b_j}
        a_col = jnp.sum(q * k_j * e, axis=1, keepdims=True)  # A[:, j]
        da_col = jnp.sum(jnp.where(col == j, d_a, 0.0), axis=1, keepdims=True)  # dA[:, j]
        dq = dq + da_col * k_j * e
        dk = dk + jnp.where(pick, jnp.sum(da_col * q * e, axis=0, keepdims=True), 0.0)
        dv = dv + jnp.where(sub_v == j, jnp.sum(a_col * do, axis=0, keepdims=True), 0.0)
        return dq, dk, dv

    zeros = (jnp.zeros((c, kd), _F32), jnp.zeros((c, kd), _F32), jnp.zeros((c, vd), _F32))
    dq, dk, dv = lax.fori_loop(0, c, body, zeros)
    return dq, dk, dv, jnp.sum(do * v, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- kernels
def _carry_over_chunks(first_ref, each_ref, last_ref, carry_scr, step):
    """One step of a recurrence sequential over the chunk grid axis (2): the carry starts as
    first_ref, each chunk's incoming carry is written to each_ref, then carry <- step(carry);
    the carry left after the last chunk goes to last_ref."""
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        carry_scr[...] = first_ref[0, 0]

    each_ref[0, 0, 0] = carry_scr[...]
    carry_scr[...] = step(carry_scr[...])

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        last_ref[0, 0] = carry_scr[...]


def _chunk_states_kernel(k_ref, v_ref, b_ref, h0_ref, states_ref, final_ref, s_scr):
    """Sequential over chunks: writes the state entering each chunk; the last one's successor
    is the final state."""
    c = k_ref.shape[2]
    b = b_ref[0, 0]
    b_last = b_ref[0, 0, c - 1:c, :]
    k_decayed = k_ref[0, 0].astype(_F32) * jnp.exp(b_last - b)  # K * e^{b_C - b}
    _carry_over_chunks(h0_ref, states_ref, final_ref, s_scr, lambda s: (
        s * jnp.exp(b_last) + _mm_tn(v_ref[0, 0].astype(_F32), k_decayed)))


def _sub_chunk(j, sub: int, scale, q_ref, k_ref, v_ref, b_ref):
    """Sub-chunk j of this chunk: (first row i0, its rows slice, q * scale, k, v in f32, b)."""
    i0 = pl.multiple_of(j * sub, sub)
    rows = pl.ds(i0, sub)
    q, k, v = (r[0, 0, rows, :].astype(_F32) for r in (q_ref, k_ref, v_ref))
    return i0, rows, q * scale, k, v, b_ref[0, 0, rows, :]


def _output_kernel(q_ref, k_ref, v_ref, b_ref, s_ref, o_ref, *, scale, sub):
    c = q_ref.shape[2]
    s_t = s_ref[0, 0, 0]  # S_[i]^T: [V, K]
    k_all = k_ref[0, 0].astype(_F32)
    v_all = v_ref[0, 0].astype(_F32)
    b_all = b_ref[0, 0]
    key_pos = lax.broadcasted_iota(jnp.int32, (sub, c), 1)

    def sub_chunk(j, carry):
        i0, rows, q, k, v, b = _sub_chunk(j, sub, scale, q_ref, k_ref, v_ref, b_ref)
        b_first = _row(b, 0)
        o = _mm_nt(q * jnp.exp(b), s_t)  # inter-chunk: (Q e^b) S
        # Keys of earlier sub-chunks, rebased on this sub-chunk's first row. The chunk's other
        # keys would get positive exponents: clamped to 0 (finite) and masked out.
        k_rebased = k_all * jnp.exp(jnp.minimum(b_first - b_all, 0.0))
        a = jnp.where(key_pos < i0, _mm_nt(q * jnp.exp(b - b_first), k_rebased), 0.0)
        o = o + _mm(a, v_all)
        o = o + _mm(_diag_block_forward(q, k, b), v)
        o_ref[0, 0, rows, :] = o.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, c // sub, sub_chunk, 0)


def _state_grads_kernel(q_ref, b_ref, do_ref, dfinal_ref, ds_ref, dh0_ref, ds_scr, *, scale):
    """Reverse over chunks (index maps run backwards): writes dS_[i+1], the gradient w.r.t. the
    state leaving each chunk; what is left at the end is d initial_state."""
    c = q_ref.shape[2]
    b = b_ref[0, 0]
    q_decayed = q_ref[0, 0].astype(_F32) * (scale * jnp.exp(b))
    _carry_over_chunks(dfinal_ref, ds_ref, dh0_ref, ds_scr, lambda ds: (
        ds * jnp.exp(b_ref[0, 0, c - 1:c, :]) + _mm_tn(do_ref[0, 0].astype(_F32), q_decayed)))


def _input_grads_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, s_ref, ds_ref,
                        dq_ref, dk_ref, dv_ref, dg_ref, *, scale, sub):
    c = q_ref.shape[2]
    s_t = s_ref[0, 0, 0]  # S_[i]^T        [V, K]
    ds_t = ds_ref[0, 0, 0]  # dS_[i+1]^T   [V, K]
    q_all = q_ref[0, 0].astype(_F32) * scale
    k_all = k_ref[0, 0].astype(_F32)
    v_all = v_ref[0, 0].astype(_F32)
    do_all = do_ref[0, 0].astype(_F32)
    b_all = b_ref[0, 0]
    b_last = b_ref[0, 0, c - 1:c, :]
    key_pos = lax.broadcasted_iota(jnp.int32, (sub, c), 1)

    def sub_chunk(j, carry):
        i0, rows, q, k, v, b = _sub_chunk(j, sub, scale, q_ref, k_ref, v_ref, b_ref)
        do = do_ref[0, 0, rows, :].astype(_F32)
        b_first, b_end = _row(b, 0), _row(b, sub - 1)
        # state terms
        dq = jnp.exp(b) * _mm(do, s_t)
        to_end = jnp.exp(b_last - b)
        dk = to_end * _mm(v, ds_t)
        dv = _mm_nt(k * to_end, ds_t)
        # dq from keys of earlier sub-chunks, rebased on this sub-chunk's first row (the other
        # keys' exponents are clamped to 0 and their terms masked out, as in the forward)
        k_rebased = k_all * jnp.exp(jnp.minimum(b_first - b_all, 0.0))
        d_a = jnp.where(key_pos < i0, _mm_nt(do, v_all), 0.0)
        dq = dq + jnp.exp(b - b_first) * _mm(d_a, k_rebased)
        # dk, dv from queries of later sub-chunks, rebased on this sub-chunk's last row
        later = key_pos >= i0 + sub
        back = jnp.exp(b_end - b)
        q_rebased = q_all * jnp.exp(jnp.minimum(b_all - b_end, 0.0))
        a_t = jnp.where(later, _mm_nt(k * back, q_rebased), 0.0)  # A[later, this]^T
        dv = dv + _mm(a_t, do_all)
        d_a_t = jnp.where(later, _mm_nt(v, do_all), 0.0)  # dA[later, this]^T
        dk = dk + back * _mm(d_a_t, q_rebased)
        dq_d, dk_d, dv_d, d_a_rr = _diag_block_backward(q, k, v, do, b)
        dq, dk, dv = dq + dq_d, dk + dk_d, dv + dv_d
        # (scale q) ⊙ (dq / scale) - k ⊙ dk, without the r = s terms that cancel in it
        dg_ref[0, 0, rows, :] = q * dq - k * dk
        dq_ref[0, 0, rows, :] = ((dq + d_a_rr * k) * scale).astype(dq_ref.dtype)
        dk_ref[0, 0, rows, :] = (dk + d_a_rr * q).astype(dk_ref.dtype)
        dv_ref[0, 0, rows, :] = dv.astype(dv_ref.dtype)
        return carry

    lax.fori_loop(0, c // sub, sub_chunk, 0)


# ----------------------------------------------------------------------------- pallas_calls
def _cost(arrays, outs, per_token_flops: int, per_token_exps: int, tokens: int):
    """XLA's view of a kernel (it cannot see inside a Mosaic call; the dry run's FLOPs and step
    time use this): FLOPs and exps per token (summed over batch and heads), bytes in and out."""
    size = lambda a: a.size * jnp.dtype(a.dtype).itemsize
    return pl.CostEstimate(flops=per_token_flops * tokens, transcendentals=per_token_exps * tokens,
                           bytes_accessed=sum(map(size, jax.tree.leaves((arrays, outs)))))


def _seq_spec(c, d, reverse_n=None):
    if reverse_n is None:
        return pl.BlockSpec((1, 1, c, d), lambda b, h, i: (b, h, i, 0))
    return pl.BlockSpec((1, 1, c, d), lambda b, h, i: (b, h, reverse_n - 1 - i, 0))


def _state_spec(kd, vd, reverse_n=None):
    if reverse_n is None:
        return pl.BlockSpec((1, 1, 1, vd, kd), lambda b, h, i: (b, h, i, 0, 0))
    return pl.BlockSpec((1, 1, 1, vd, kd), lambda b, h, i: (b, h, reverse_n - 1 - i, 0, 0))


def _bh_spec(kd, vd):
    return pl.BlockSpec((1, 1, vd, kd), lambda b, h, i: (b, h, 0, 0))


def _gla_call(kernel, cfg: Config, *, grid, in_specs, out_specs, out_shape, name: str, cost,
              sequential: bool = False, scratch_shapes=()):
    """pl.pallas_call of one of the four kernels over (batch, head, chunk); `sequential`: the
    chunk axis carries a recurrence (arbitrary order), else every axis is parallel."""
    semantics = ("parallel", "parallel", "arbitrary" if sequential else "parallel")
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch_shapes, compiler_params=_compiler_params(cfg.interpret, semantics),
        interpret=cfg.interpret, name=name, cost_estimate=cost)


def _state_pass_shapes(bs, hs, n, kd, vd):
    """(n, the outputs of a sequential state pass: one [V, K] f32 state per chunk [B, H, N, V, K]
    and the one left at the end [B, H, V, K])."""
    return n, [jax.ShapeDtypeStruct((bs, hs, n, vd, kd), _F32),
               jax.ShapeDtypeStruct((bs, hs, vd, kd), _F32)]


def chunk_states(k, v, b, h0, cfg: Config):
    """k, b: [B, H, T, K]; v: [B, H, T, V]; h0: [B, H, V, K] f32 (transposed state).
    Returns (states entering each chunk [B, H, N, V, K], final state [B, H, V, K]), f32."""
    (bs, hs, t, kd), vd, c = k.shape, v.shape[-1], cfg.chunk
    n, out_shapes = _state_pass_shapes(bs, hs, t // c, kd, vd)
    fk, fv = cfg.dims or (kd, vd)  # costs count the unpadded head dims
    return _gla_call(
        _chunk_states_kernel, cfg, grid=(bs, hs, n),
        in_specs=[_seq_spec(c, kd), _seq_spec(c, vd), _seq_spec(c, kd), _bh_spec(kd, vd)],
        out_specs=[_state_spec(kd, vd), _bh_spec(kd, vd)], out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM((vd, kd), _F32)], sequential=True,
        name="gla_chunk_states",
        cost=_cost((k, v, b, h0), out_shapes, 2 * fk * fv, fk, bs * hs * t),
    )(k, v, b, h0)


def chunk_output(q, k, v, b, states, cfg: Config):
    bs, hs, t, kd = q.shape
    vd = v.shape[-1]
    c = cfg.chunk
    out_shapes = jax.ShapeDtypeStruct((bs, hs, t, vd), v.dtype)
    fk, fv = cfg.dims or (kd, vd)  # costs count the unpadded head dims
    return _gla_call(
        functools.partial(_output_kernel, scale=cfg.scale, sub=cfg.sub), cfg,
        grid=(bs, hs, t // c),
        in_specs=[_seq_spec(c, kd), _seq_spec(c, kd), _seq_spec(c, vd), _seq_spec(c, kd),
                  _state_spec(kd, vd)],
        out_specs=_seq_spec(c, vd), out_shape=out_shapes,
        name="gla_chunk_output",
        cost=_cost((q, k, v, b, states), out_shapes, 2 * fk * fv + c * (fk + fv), 2 * fk,
                   bs * hs * t),
    )(q, k, v, b, states)


def chunk_state_grads(q, b, do, dfinal, cfg: Config):
    """Returns (dS of the state leaving each chunk [B, H, N, V, K], d h0 [B, H, V, K]), f32."""
    (bs, hs, t, kd), vd, c = q.shape, do.shape[-1], cfg.chunk
    n, out_shapes = _state_pass_shapes(bs, hs, t // c, kd, vd)
    fk, fv = cfg.dims or (kd, vd)  # costs count the unpadded head dims
    return _gla_call(
        functools.partial(_state_grads_kernel, scale=cfg.scale), cfg, grid=(bs, hs, n),
        in_specs=[_seq_spec(c, kd, n), _seq_spec(c, kd, n), _seq_spec(c, vd, n),
                  _bh_spec(kd, vd)],
        out_specs=[_state_spec(kd, vd, n), _bh_spec(kd, vd)], out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM((vd, kd), _F32)], sequential=True,
        name="gla_chunk_state_grads",
        cost=_cost((q, b, do, dfinal), out_shapes, 2 * fk * fv, fk, bs * hs * t),
    )(q, b, do, dfinal)


def chunk_input_grads(q, k, v, b, do, states, dstates, cfg: Config):
    """Returns dq, dk (dtypes of q, k), dv (dtype of v) and q ⊙ dq - k ⊙ dk (f32)."""
    bs, hs, t, kd = q.shape
    vd = v.shape[-1]
    c = cfg.chunk
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(q.shape, _F32)]
    fk, fv = cfg.dims or (kd, vd)  # costs count the unpadded head dims
    return _gla_call(
        functools.partial(_input_grads_kernel, scale=cfg.scale, sub=cfg.sub), cfg,
        grid=(bs, hs, t // c),
        in_specs=[_seq_spec(c, kd), _seq_spec(c, kd), _seq_spec(c, vd), _seq_spec(c, kd),
                  _seq_spec(c, vd), _state_spec(kd, vd), _state_spec(kd, vd)],
        out_specs=[_seq_spec(c, kd), _seq_spec(c, kd), _seq_spec(c, vd), _seq_spec(c, kd)],
        out_shape=out_shapes,
        name="gla_chunk_input_grads",
        cost=_cost((q, k, v, b, do, states, dstates), out_shapes,
                   6 * fk * fv + 2 * c * (fk + fv), 2 * fk, bs * hs * t),
    )(q, k, v, b, do, states, dstates)


# ----------------------------------------------------------------------------- state pass on GPU
# The GPU lowering has no sequential grid axis, so each program walks the chunks of one (batch,
# head, block of value rows) in a loop inside the kernel, the state carried in registers (fla's
# arrangement). Rows of S^T [V, K] evolve independently (the decay scales columns), so the value
# dim splits over programs for parallelism.
def _gpu_value_block(kd: int, vd: int) -> int:
    """Value rows per program: the [bv, K] f32 state and a [chunk, K] f32 operand in registers
    (a heuristic no GPU has timed yet: 64 rows up to K = 128, 32 beyond)."""
    return min(vd, 64 if kd <= 128 else 32)


def _loop_states_kernel(k_ref, b_ref, v_ref, h0_ref, states_ref, final_ref, *, chunk: int):
    """Refs: k, b [T, K] and v [T, bv] whole; h0, final [bv, K]; states [N, bv, K].
    S_[i+1] = S_[i] e^{b_C} + V^T (K e^{b_C - b}), S_[0] = h0; writes S_[i] for each chunk."""
    def step(i, s):
        start = pl.multiple_of(i * chunk, chunk)
        rows = pl.ds(start, chunk)
        b_last = b_ref[pl.ds(start + chunk - 1, 1), :]                 # [1, K]
        states_ref[i] = s
        k_decayed = k_ref[rows, :].astype(_F32) * jnp.exp(b_last - b_ref[rows, :])
        return s * jnp.exp(b_last) + _mm_tn(v_ref[rows, :].astype(_F32), k_decayed)

    final_ref[...] = lax.fori_loop(0, k_ref.shape[0] // chunk, step, h0_ref[...])


def _loop_state_grads_kernel(q_ref, b_ref, do_ref, dfinal_ref, ds_ref, dh0_ref, *, chunk: int,
                             scale: float):
    """Refs: q, b [T, K] and dO [T, bv] whole; dfinal, dh0 [bv, K]; ds [N, bv, K]. Reverse:
    dS_[i] = dS_[i+1] e^{b_C} + dO^T (Q scale e^b); writes dS_[i+1] for each chunk i."""
    n = q_ref.shape[0] // chunk

    def step(t, ds):
        i = n - 1 - t
        start = pl.multiple_of(i * chunk, chunk)
        rows = pl.ds(start, chunk)
        ds_ref[i] = ds
        q_decayed = q_ref[rows, :].astype(_F32) * (scale * jnp.exp(b_ref[rows, :]))
        return (ds * jnp.exp(b_ref[pl.ds(start + chunk - 1, 1), :])
                + _mm_tn(do_ref[rows, :].astype(_F32), q_decayed))

    dh0_ref[...] = lax.fori_loop(0, n, step, dfinal_ref[...])


def _loop_call(kernel, cfg: Config, seq_arrays, value_array, first, *, name: str, cost):
    """pl.pallas_call of a loop state pass over grid (B, H, V / bv): `seq_arrays` [B, H, T, K]
    and `value_array` [B, H, T, V] whole per program (its bv columns), `first` [B, H, V, K]."""
    bs, hs, t, kd = seq_arrays[0].shape
    vd = value_array.shape[-1]
    bv = _gpu_value_block(kd, vd)
    if vd % bv:
        raise ValueError(f"gla loop state pass: V={vd} is not a multiple of its value block {bv} "
                         f"(gla_pallas pads head dims to powers of two on GPU)")
    n, out_shapes = _state_pass_shapes(bs, hs, t // cfg.chunk, kd, vd)
    seq = pl.BlockSpec((None, None, t, kd), lambda b, h, j: (b, h, 0, 0))
    rows = pl.BlockSpec((None, None, bv, kd), lambda b, h, j: (b, h, j, 0))
    return _gla_call(
        kernel, cfg, grid=(bs, hs, vd // bv),
        in_specs=[seq] * len(seq_arrays) + [
            pl.BlockSpec((None, None, t, bv), lambda b, h, j: (b, h, 0, j)), rows],
        out_specs=[pl.BlockSpec((None, None, n, bv, kd), lambda b, h, j: (b, h, 0, j, 0)), rows],
        out_shape=out_shapes, name=name, cost=cost(out_shapes))(*seq_arrays, value_array, first)


def chunk_states_loop(k, v, b, h0, cfg: Config):
    """chunk_states' contract, as a GPU kernel looping over the chunks."""
    kd, vd, tokens = k.shape[-1], v.shape[-1], k.shape[0] * k.shape[1] * k.shape[2]
    fk, fv = cfg.dims or (kd, vd)  # costs count the unpadded head dims
    return _loop_call(
        functools.partial(_loop_states_kernel, chunk=cfg.chunk), cfg, (k, b), v, h0,
        name="gla_chunk_states_loop",
        cost=lambda outs: _cost((k, v, b, h0), outs, 2 * fk * fv, fk, tokens))


def chunk_state_grads_loop(q, b, do, dfinal, cfg: Config):
    """chunk_state_grads' contract, as a GPU kernel looping over the chunks in reverse."""
    kd, vd, tokens = q.shape[-1], do.shape[-1], q.shape[0] * q.shape[1] * q.shape[2]
    fk, fv = cfg.dims or (kd, vd)  # costs count the unpadded head dims
    return _loop_call(
        functools.partial(_loop_state_grads_kernel, chunk=cfg.chunk, scale=cfg.scale),
        cfg, (q, b), do, dfinal, name="gla_chunk_state_grads_loop",
        cost=lambda outs: _cost((q, b, do, dfinal), outs, 2 * fk * fv, fk, tokens))


# ----------------------------------------------------------------------------- custom_vjp
def _chunk_cumsum(log_g, c):
    """b: cumulative sum of log_g within each chunk (f32), [B, H, T, K]."""
    bs, hs, t, kd = log_g.shape
    return jnp.cumsum(log_g.reshape(bs, hs, t // c, c, kd), axis=3).reshape(log_g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gla_core(q, k, v, log_g, h0, cfg: Config):
    """Kernel-layout GLA. q, k: [B, H, T, K]; v: [B, H, T, V]; log_g: f32 [B, H, T, K];
    h0: f32 [B, H, V, K] (transposed); T a multiple of cfg.chunk.
    Returns (o [B, H, T, V] in v.dtype, final state^T [B, H, V, K] f32)."""
    return _gla_fwd(q, k, v, log_g, h0, cfg)[0]


def _state_passes(cfg):
    if cfg.state_pass == "kernel":
        return chunk_states, chunk_state_grads
    if cfg.state_pass == "loop":
        return chunk_states_loop, chunk_state_grads_loop
    raise ValueError(f"Config.state_pass must be 'kernel' or 'loop', got {cfg.state_pass!r}")


def _gla_fwd(q, k, v, log_g, h0, cfg):
    b = _chunk_cumsum(log_g, cfg.chunk)
    states, final = _state_passes(cfg)[0](k, v, b, h0, cfg)
    o = chunk_output(q, k, v, b, states, cfg)
    return (o, final), (q, k, v, log_g, h0)


def _gla_bwd(cfg, res, cotangents):
    q, k, v, log_g, h0 = res
    do, dfinal = cotangents
    b = _chunk_cumsum(log_g, cfg.chunk)
    state_fwd, state_bwd = _state_passes(cfg)
    states, final = state_fwd(k, v, b, h0, cfg)  # recomputed rather than stored
    dstates, dh0 = state_bwd(q, b, do, dfinal, cfg)
    dq, dk, dv, dg_terms = chunk_input_grads(q, k, v, b, do, states, dstates, cfg)
    # With B_t the cumulative sum of log_g over the whole sequence, the loss depends on B through
    # q_t e^{B_t}, k_t e^{-B_t} and the factor e^{B_T} of the final state, so
    #   dL/dB_t = q_t ⊙ dq_t - k_t ⊙ dk_t + [t = T] sum_v (S_T ⊙ dS_T)
    # and d log_g_t = sum_{t' >= t} dL/dB_t' (the initial state enters through q ⊙ dq).
    dg = lax.cumsum(dg_terms, axis=2, reverse=True)
    dg = dg + jnp.sum(final * dfinal, axis=2)[:, :, None, :]
    return dq, dk, dv, dg, dh0


gla_core.defvjp(_gla_fwd, _gla_bwd)
