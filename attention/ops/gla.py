"""Gated linear attention (Yang et al., ICML 2024): the recurrence, its chunkwise-parallel form,
and the decode step. Public API (see DESIGN.md, "Attention ops"):

    gla(q, k, v, log_g, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, impl="auto") -> (o, final_state_or_None)
    gla_step(q_t, k_t, v_t, log_g_t, state, *, scale=None) -> (o_t, state)

q, k, log_g: [B, T, H, K]; v: [B, T, H, V]; log_g <= 0 is the log forget gate (per key dim);
states [B, H, K, V] float32. Any T. impl:
  "reference": the token-by-token recurrence in f32 (lax.scan), the ground truth;
  "xla": the chunkwise form with (recursive) secondary chunking, every exponent <= 0; the
         CPU default;
  "pallas": the kernels in pallas_kernels/gla (forward and backward, custom_vjp; TPU, and
            interpret mode on CPU);
  "auto": pallas on TPU, else xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

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


def gla(q, k, v, log_g, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, impl="auto"):
    """o_t = (scale q_t) S_t with S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t (GLA eq. 1-2).

    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] f32 or None)."""
    _check(q, k, v, log_g, initial_state, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        # the kernels carry the chunk state over a sequential grid axis: TPU (Mosaic) only so far
        impl = "pallas" if platform.backend() == "tpu" and _pallas() else "xla"
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


def _intra_chunk_output(q, k, v, b):
    """o_r = sum_{s<=r} (sum_d q_rd k_sd exp(b_rd - b_sd)) v_s within each chunk (GLA sec. 4.2).

    q, k, b: [..., C, K]; v: [..., C, V]; C a power of two; b is the within-chunk cumsum of
    log_g (non-increasing in r). Secondary chunking applied recursively: at level s the chunk is
    cut into groups of 2s rows, and each group's right half (queries) attends to its left half
    (keys) as one matmul, both sides rebased on m = b at the left half's last row:
    (q e^(b - m)) (k e^(m - b))^T, every exponent <= 0. The levels s = 1, 2, 4, ..., C/2 cover
    every pair s < r exactly once; the diagonal r = s has decay e^0 = 1. This costs one exp per
    element per level plus matmuls, where the flat form would cost C exps per element."""
    *lead, C, K = q.shape
    V = v.shape[-1]
    o = jnp.sum(q * k, axis=-1, keepdims=True) * v                  # r == s
    s = 1
    while s < C:
        G = C // (2 * s)
        qg, kg, bg = (x.reshape(*lead, G, 2, s, K) for x in (q, k, b))
        m = bg[..., 0, s - 1:, :]                                   # [..., G, 1, K]
        q_r = qg[..., 1, :, :] * jnp.exp(bg[..., 1, :, :] - m)     # right half, b <= m
        k_l = kg[..., 0, :, :] * jnp.exp(m - bg[..., 0, :, :])     # left half, b >= m
        v_l = v.reshape(*lead, G, 2, s, V)[..., 0, :, :]
        if s <= 4:  # tiny blocks: broadcast-and-sum beats XLA:CPU's batched dot here
            a = jnp.sum(q_r[..., :, None, :] * k_l[..., None, :, :], axis=-1)
            o_r = jnp.sum(a[..., None] * v_l[..., None, :, :], axis=-2)
        else:
            a = jnp.einsum("...rk,...sk->...rs", q_r, k_l)
            o_r = jnp.einsum("...rs,...sv->...rv", a, v_l)
        o = o + jnp.stack([jnp.zeros_like(o_r), o_r], axis=-3).reshape(*lead, C, V)
        s *= 2
    return o


def gla_chunked(q, k, v, log_g, *, scale, initial_state=None, chunk_size=64):
    """The chunkwise-parallel form (GLA sec. 4): per chunk i, with b the within-chunk cumsum of
    log_g,  O = (Q e^b) S_[i] + intra(Q, K, V, b)  and  S_[i+1] = diag(e^(b_C)) S_[i] +
    (K e^(b_C - b))^T V. The intra-chunk part runs in parallel over chunks; the chunk-state
    recurrence is a scan over chunks. Differentiable by autodiff; f32 inside.
    chunk_size: a power of two (capped at the padded length). Returns (o in v's dtype,
    final state f32)."""
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    C = int(chunk_size)
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    C = min(C, 1 << max(T - 1, 0).bit_length())  # a short sequence needs no 64-row chunk
    f32 = jnp.float32
    Tp = -(-T // C) * C
    pad = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
    # zero q, k, v and log_g = 0 leave the state unchanged: padding is exact
    q, k, v, log_g = (jnp.pad(x.astype(f32), pad) for x in (q, k, v, log_g))
    N = Tp // C

    def chunks(x):  # [B, Tp, H, D] -> [N, B, H, C, D]: chunk axis leading for the scan
        return x.reshape(B, N, C, H, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    qc, kc, vc, gc = chunks(q * scale), chunks(k), chunks(v), chunks(log_g)
    b = jnp.cumsum(gc, axis=-2)                                     # [N, B, H, C, K]
    b_last = b[..., -1:, :]
    u = jnp.einsum("nbhck,nbhcv->nbhkv", kc * jnp.exp(b_last - b), vc)
    decay = jnp.exp(b_last[..., 0, :])[..., None]                   # [N, B, H, K, 1], <= 1

    def step(s, xs):  # S_[i+1] = diag(d_i) S_[i] + U_i
        d, u_i = xs
        return d * s + u_i, s

    s0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    s_final, s_before = jax.lax.scan(step, s0, (decay, u))
    o = _intra_chunk_output(qc, kc, vc, b)
    if initial_state is not None or N > 1:  # otherwise no state enters the only chunk
        o = o + jnp.einsum("nbhck,nbhkv->nbhcv", qc * jnp.exp(b), s_before)
    o = o.transpose(1, 0, 3, 2, 4).reshape(B, Tp, H, V)[:, :T]
    return o.astype(out_dtype), s_final
