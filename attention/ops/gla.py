"""Gated linear attention (Yang et al., ICML 2024): the recurrence, its chunkwise-parallel form,
and the decode step. Public API (see DESIGN.md, "Attention ops"):

    gla(q, k, v, log_g, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, impl="auto") -> (o, final_state_or_None)
    gla_step(q_t, k_t, v_t, log_g_t, state, *, scale=None) -> (o_t, state)

q, k, log_g: [B, T, H, K]; v: [B, T, H, V]; log_g <= 0 is the log forget gate (per key dim);
states [B, H, K, V] float32. Any T. impl:
  "reference": the token-by-token recurrence in f32 (lax.scan), the ground truth;
  "xla": the chunkwise form with (recursive) secondary chunking, every decay factor a product
         of gates <= 1 (no positive exponent), scanned over blocks of the sequence, with a
         hand-written backward; the CPU default;
  "pallas": the kernels in pallas_kernels/gla (forward and backward, custom_vjp): TPU
            (Mosaic); GPU (Pallas's Triton lowering, the chunk-state passes as in-kernel loops:
            lowered in the tests, not yet timed on a GPU); interpret mode on CPU;
  "auto": pallas on TPU, else xla.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform

IMPLS = ("auto", "pallas", "xla", "reference")


def _check(q, k, v, log_g, initial_state, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if q.ndim != 4 or k.shape != q.shape or log_g.shape != q.shape:
        raise ValueError(f"q, k and log_g must share one [B, T, H, K] shape; got q {q.shape}, "
                         f"k {k.shape}, log_g {log_g.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H {q.shape[:3]}; got {v.shape}")
    B, _, H, K = q.shape
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}; "
                         f"got {initial_state.shape}")


def resolve_impl(impl: str, caller: str = "gla") -> str:
    """The path `gla(..., impl=impl)` takes here: "auto" is the Pallas kernels on TPU, else xla,
    said once (naming `caller` and why) on an accelerator that does not take them."""
    if impl != "auto":
        return impl
    # pallas on TPU; its GPU arrangement has not been timed against xla on a GPU yet
    if platform.backend() == "tpu" and _pallas():
        return "pallas"
    if platform.backend() != "cpu":
        platform.note_fallback(
            caller, "GLA", "pallas_kernels.gla is not importable" if platform.backend() == "tpu"
            else "its GPU kernels (impl='pallas') are not yet timed against the XLA path on a GPU")
    return "xla"


def gla(q, k, v, log_g, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, impl="auto", caller: str = "gla"):
    """o_t = (scale q_t) S_t with S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t (GLA eq. 1-2).

    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] f32 or None)."""
    _check(q, k, v, log_g, initial_state, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_impl(impl, caller)
    if impl == "reference":
        o, s = gla_reference(q, k, v, log_g, scale=scale, initial_state=initial_state)
    elif impl == "xla":
        o, s = gla_chunked(q, k, v, log_g, scale=scale, initial_state=initial_state,
                           chunk_size=chunk_size)
    else:
        kernel = _pallas()
        if kernel is None:
            raise RuntimeError("impl='pallas': pallas_kernels.gla is not available in "
                                      "this build; use impl='xla'")
        B, _, H, K = q.shape
        h0 = (jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None
              else initial_state)

        def run(q, k, v, log_g, h0):
            return kernel(q, k, v, log_g, scale=scale, initial_state=h0, output_final_state=True,
                          chunk_size=chunk_size)

        # a sharded model runs the kernel per device on its batch / head slice
        o, s = platform.per_shard(run, (q, k, v, log_g, h0), batch_dims=(0, 0, 0, 0, 0),
                                  head_dims=(2, 2, 2, 2, 1), out_batch_dims=(0, 0),
                                  out_head_dims=(2, 1))
    return o, (s if output_final_state else None)


def _pallas():
    try:
        from pallas_kernels.gla import gla_pallas
    except ImportError:
        return None
    return gla_pallas


def gla_step(q_t, k_t, v_t, log_g_t, state, *, scale=None):
    """One decoding step. q_t, k_t, log_g_t: [B, H, K]; v_t: [B, H, V]; state [B, H, K, V] f32.
    Returns (o_t [B, H, V] in v_t's dtype, the new state)."""
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    f32 = jnp.float32
    state = (jnp.exp(log_g_t.astype(f32))[..., None] * state
             + k_t.astype(f32)[..., None] * v_t.astype(f32)[..., None, :])
    o = jnp.einsum("bhk,bhkv->bhv", q_t.astype(f32) * scale, state)
    return o.astype(v_t.dtype), state


def gla_reference(q, k, v, log_g, *, scale, initial_state=None):
    """The recurrence token by token in f32 (lax.scan over T): the ground truth."""
    B, T, H, K = q.shape
    f32 = jnp.float32
    s0 = (jnp.zeros((B, H, K, v.shape[-1]), f32) if initial_state is None
          else initial_state.astype(f32))

    def step(s, xs):
        q_t, k_t, v_t, g_t = xs
        o_t, s = gla_step(q_t.astype(f32), k_t, v_t.astype(f32), g_t, s, scale=scale)
        return s, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_g))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), s


# ---------------------------------------------------------------------------------------------
# impl="xla": the chunkwise form, blocked, with a hand-written backward.
#
# Layout: the sequence is cut into blocks of BLOCK tokens, each a few chunks of C rows; a
# lax.scan over blocks carries the state [B, H, K, V], so one block's arrays (~0.5 MB at H=4,
# K=64) stay in cache while the ~150 XLA ops of its forward and backward run over them
# (measured at T = 8k: blocking alone made the earlier autodiff form 1.4x faster; the hand-written
# backward and the gate products another 2x). Within a chunk every decay factor
# is a product of gates e^(log_g) <= 1 (secondary chunking, below), so no exponent is positive.
# The backward recomputes each block from its initial state; dlog_g comes from the identity
# dL/db = q * dq - k * dk (b the within-chunk cumulative log gate) plus each chunk's state terms.

BLOCK = 512  # tokens per scan step (a multiple of the chunk)
_TINY = 8    # blocks of <= _TINY rows: broadcast-and-sum beats XLA:CPU's batched dot (measured)


def _qkt(x, y):
    """[..., r, d] x [..., s, d] -> [..., r, s]."""
    if min(x.shape[-2], y.shape[-2]) <= _TINY:
        return jnp.sum(x[..., :, None, :] * y[..., None, :, :], axis=-1)
    return jnp.einsum("...rd,...sd->...rs", x, y)


def _av(a, y):
    """[..., r, s] x [..., s, d] -> [..., r, d]."""
    if a.shape[-1] <= _TINY:
        return jnp.sum(a[..., :, :, None] * y[..., None, :, :], axis=-2)
    return jnp.einsum("...rs,...sd->...rd", a, y)


def _atv(a, y):
    """[..., r, s] x [..., r, d] -> [..., s, d]."""
    if a.shape[-2] <= _TINY:
        return jnp.sum(a[..., :, :, None] * y[..., :, None, :], axis=-3)
    return jnp.einsum("...rs,...rd->...sd", a, y)


def _halves(x, s):
    """[..., C, D] -> [..., C / 2s, 2, s, D]: groups of 2s rows, each cut into two halves."""
    *lead, C, D = x.shape
    return x.reshape(*lead, C // (2 * s), 2, s, D)


def _put(x, half, s):
    """[..., G, s, D] -> [..., 2 G s, D]: x on the `half` (0 left, 1 right) of each group."""
    z = jnp.zeros_like(x)
    *lead, G, _, D = x.shape
    return jnp.stack([x, z] if half == 0 else [z, x], axis=-3).reshape(*lead, G * 2 * s, D)


def _levels(gate):
    """Secondary chunking of a chunk (GLA sec. 4.2), recursively: at level s = 1, 2, 4, ..., C/2
    the chunk is cut into groups of 2s rows and each group's right half (queries) attends to its
    left half (keys), both rebased on m = b at the left half's last row:
    (q e^(b - m)) (k e^(m - b))^T, so every factor is <= 1. The levels cover each pair s < r once.
    gate: e^log_g [..., C, K]. Yields (s, fq = e^(b - m) on the right halves [..., G, s, K],
    fk = e^(m - b) on the left halves or None where it is 1), then (None, e^b, e^(b_C - b)).
    The factors are products of gates kept per level: P (inclusive prefix products within
    aligned s-row blocks) and S (exclusive suffix products), one multiply per element per level
    instead of an exp."""
    C = gate.shape[-2]
    P, S = gate, None
    s = 1
    while s < C:
        Pg = _halves(P, s)
        fq = Pg[..., 1, :, :]
        fk = None if S is None else _halves(S, s)[..., 0, :, :]
        yield s, fq, fk
        left, right = Pg[..., 0, -1:, :], Pg[..., 1, -1:, :]           # the halves' products
        P = jnp.stack([Pg[..., 0, :, :], fq * left], axis=-3).reshape(P.shape)
        S_right = jnp.ones_like(fq) if S is None else _halves(S, s)[..., 1, :, :]
        S_left = jnp.broadcast_to(right, fq.shape) if S is None else fk * right
        S = jnp.stack([S_left, S_right], axis=-3).reshape(P.shape)
        s *= 2
    yield None, P, (jnp.ones_like(P) if S is None else S)


def _rebased(q, k, s, fq, fk):
    q_r = _halves(q, s)[..., 1, :, :] * fq
    k_l = _halves(k, s)[..., 0, :, :]
    return q_r, (k_l if fk is None else k_l * fk)


def _intra_fwd(q, k, v, gate):
    """o_r = sum_{s<=r} (sum_d q_rd k_sd e^(b_rd - b_sd)) v_s within each chunk; q, k, gate:
    [..., C, K], v: [..., C, V]. Returns (o, e^b, e^(b_C - b))."""
    o = jnp.sum(q * k, axis=-1, keepdims=True) * v                 # r == s: decay e^0 = 1
    for s, fq, fk in _levels(gate):
        if s is None:
            return o, fq, fk
        q_r, k_l = _rebased(q, k, s, fq, fk)
        a = _qkt(q_r, k_l)
        o = o + _put(_av(a, _halves(v, s)[..., 0, :, :]), 1, s)


def _intra_bwd(q, k, v, gate, do):
    """The gradients of _intra_fwd's o with respect to q, k and v (cotangent do), and e^b,
    e^(b_C - b)."""
    w = jnp.sum(do * v, axis=-1, keepdims=True)
    dq, dk = w * k, w * q
    dv = jnp.sum(q * k, axis=-1, keepdims=True) * do
    for s, fq, fk in _levels(gate):
        if s is None:
            return dq, dk, dv, fq, fk
        q_r, k_l = _rebased(q, k, s, fq, fk)
        v_l = _halves(v, s)[..., 0, :, :]
        do_r = _halves(do, s)[..., 1, :, :]
        a, da = _qkt(q_r, k_l), _qkt(do_r, v_l)
        dv = dv + _put(_atv(a, do_r), 0, s)
        dq = dq + _put(_av(da, k_l) * fq, 1, s)
        dk_l = _atv(da, q_r)
        dk = dk + _put(dk_l if fk is None else dk_l * fk, 0, s)


def _chunk_states(s_in, k, v, eb, ebr):
    """S_[i+1] = diag(e^(b_C)) S_[i] + (K e^(b_C - b))^T V over a block's chunks (axis 2).
    Returns (K e^(b_C - b), e^(b_C) [B, H, N, K, 1], the states S_[0..N] [B, H, N + 1, K, V])."""
    kd = k * ebr
    u = jnp.einsum("bhnck,bhncv->bhnkv", kd, v)
    d = eb[..., -1, :, None]
    states = [s_in]
    for i in range(u.shape[2]):  # a few chunks per block: unrolled, fused by XLA
        states.append(d[:, :, i] * states[-1] + u[:, :, i])
    return kd, d, jnp.stack(states, axis=2)


def _block_fwd(s_in, q, k, v, log_g):
    """One block, chunks on axis 2: q, k, log_g [B, H, N, C, K], v [B, H, N, C, V] (f32, q
    scaled). O = (Q e^b) S_[i] + intra (GLA sec. 4). Returns (state after, o)."""
    o, eb, ebr = _intra_fwd(q, k, v, jnp.exp(log_g))
    states = _chunk_states(s_in, k, v, eb, ebr)[2]
    return states[:, :, -1], o + jnp.einsum("bhnck,bhnkv->bhncv", q * eb, states[:, :, :-1])


def _block_bwd(s_in, q, k, v, log_g, do, ds_out):
    """The backward of _block_fwd given the cotangents of o (do) and of the state after the
    block (ds_out). Returns (ds_in, dq, dk, dv, dlog_g)."""
    dq, dk, dv, eb, ebr = _intra_bwd(q, k, v, jnp.exp(log_g), do)
    kd, d, states = _chunk_states(s_in, k, v, eb, ebr)
    s_before = states[:, :, :-1]
    local = jnp.einsum("bhnck,bhncv->bhnkv", q * eb, do)          # dL/dS_[i] from chunk i's o
    du, g = [None] * local.shape[2], ds_out
    for i in reversed(range(local.shape[2])):
        du[i] = g                                                  # dL/dS_[i+1]
        g = local[:, :, i] + d[:, :, i] * g
    du = jnp.stack(du, axis=2)
    dq = dq + jnp.einsum("bhncv,bhnkv->bhnck", do, s_before) * eb
    dk = dk + jnp.einsum("bhncv,bhnkv->bhnck", v, du) * ebr
    dv = dv + jnp.einsum("bhnck,bhnkv->bhncv", kd, du)
    # dL/db = q dq - k dk (b the within-chunk cumsum; every pair (r, s) adds +x to b_r and -x to
    # b_s), plus b_C's terms on the last row: through u (sum_r k_r dk_r of the state path =
    # sum_v U dS_[i+1]) and through the decay (sum_v e^(b_C) S_[i] dS_[i+1]), together
    # sum_v S_[i+1] dS_[i+1]. dlog_g is its within-chunk reverse cumsum. The barrier keeps XLA
    # from fusing (and recomputing) dq and dk into the matmul's operand.
    db = jax.lax.optimization_barrier(q * dq - k * dk)
    last = jnp.sum(states[:, :, 1:] * du, axis=-1)                 # [B, H, N, K]
    return g, dq, dk, dv, _reverse_cumsum_chunk(db) + last[..., None, :]


def _reverse_cumsum_chunk(x):
    """sum_{r' >= r} x_r' along axis -2 (C rows) by triangular matmuls: within groups of 8
    rows, then across the groups (C/8 as many flops as one C x C matmul)."""
    *lead, C, K = x.shape
    c = min(C, 8)
    n = C // c
    upper = lambda m: jnp.asarray(np.triu(np.ones((m, m), np.float32)))  # noqa: E731
    w = jnp.einsum("rc,...gck->...grk", upper(c), x.reshape(*lead, n, c, K))
    later = jnp.einsum("gh,...hk->...gk", upper(n) - np.eye(n, dtype=np.float32), w[..., 0, :])
    return (w + later[..., None, :]).reshape(*lead, C, K)


def _geometry(T, chunk_size):
    """(chunk C, chunks per block N, blocks nb); nb N C >= T, blocks of about BLOCK tokens."""
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())  # a short sequence needs no 64-row chunk
    chunks = -(-T // C)
    per_block = max(min(BLOCK // C, 32), 1)                 # <= 32: the state loop is unrolled
    nb = -(-chunks // per_block)
    return C, -(-chunks // nb), nb


def _blocks(x, Tp, nb):
    """[B, T, H, D] -> [nb, B, Tp / nb, H, D] f32, zero-padded to Tp (zero q, k, v and log_g = 0
    leave the state unchanged: padding is exact)."""
    B, T, H, D = x.shape
    x = x.astype(jnp.float32)
    if Tp != T:
        x = jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, 0)])
    return jnp.moveaxis(x.reshape(B, nb, Tp // nb, H, D), 1, 0)


def _unblocks(x, T):
    nb, B, Tb, H, D = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(B, nb * Tb, H, D)[:, :T]


def _chunked(x, C):
    """A block [B, Tb, H, D] -> [B, H, Tb / C, C, D]."""
    B, Tb, H, D = x.shape
    return x.reshape(B, Tb // C, C, H, D).transpose(0, 3, 1, 2, 4)


def _unchunked(x):
    B, H, N, C, D = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, D)


def gla_chunked(q, k, v, log_g, *, scale, initial_state=None, chunk_size=64):
    """The chunkwise-parallel form (GLA sec. 4): per chunk i, with b the within-chunk cumsum of
    log_g,  O = (Q e^b) S_[i] + intra(Q, K, V, b)  and  S_[i+1] = diag(e^(b_C)) S_[i] +
    (K e^(b_C - b))^T V; intra with secondary chunking (every factor <= 1). Blocked over the
    sequence, with a hand-written backward (see the notes above BLOCK); f32 inside.
    chunk_size: a power of two (capped at the padded length); scale: a Python number.
    Returns (o in v's dtype, final state f32)."""
    C = int(chunk_size)
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    B, _, H, K = q.shape
    h0 = (jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None
          else initial_state)
    return _gla_xla(q, k, v, log_g, h0, float(scale), C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gla_xla(q, k, v, log_g, h0, scale, chunk_size):
    return _gla_xla_fwd(q, k, v, log_g, h0, scale, chunk_size)[0]


def _gla_xla_fwd(q, k, v, log_g, h0, scale, chunk_size):
    T = q.shape[1]
    C, N, nb = _geometry(T, chunk_size)
    xs = tuple(_blocks(x, nb * N * C, nb) for x in (q, k, v, log_g))

    def step(s, x):
        qb, kb, vb, gb = (_chunked(y, C) for y in x)
        s_out, o = _block_fwd(s, qb * scale, kb, vb, gb)
        return s_out, (_unchunked(o), s)

    s_final, (o, s_in) = jax.lax.scan(step, h0.astype(jnp.float32), xs)
    o = _unblocks(o, T).astype(v.dtype)
    # residuals: the blocked f32 inputs and each block's initial state
    return (o, s_final), (xs, s_in, (q, k, v, log_g, h0))


def _gla_xla_bwd(scale, chunk_size, res, cts):
    xs, s_in, originals = res
    do, ds_final = cts
    T = do.shape[1]
    C, N, nb = _geometry(T, chunk_size)

    def step(ds, x):
        s, *blk = x
        qb, kb, vb, gb, dob = (_chunked(y, C) for y in blk)
        ds, dq, dk, dv, dg = _block_bwd(s, qb * scale, kb, vb, gb, dob, ds)
        return ds, tuple(_unchunked(y) for y in (dq * scale, dk, dv, dg))

    dh0, grads = jax.lax.scan(step, ds_final.astype(jnp.float32),
                              (s_in, *xs, _blocks(do, nb * N * C, nb)), reverse=True)
    grads = tuple(_unblocks(g, T).astype(x.dtype) for g, x in zip(grads, originals))
    return (*grads, dh0.astype(originals[4].dtype))


_gla_xla.defvjp(_gla_xla_fwd, _gla_xla_bwd)
