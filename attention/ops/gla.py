"""Gated linear attention (Yang et al., ICML 2024): the recurrence, its chunkwise-parallel form,
and the decode step. Public API (see DESIGN.md, "Attention ops"):

    gla(q, k, v, log_g, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, impl="auto") -> (o, final_state_or_None)
    gla_step(q_t, k_t, v_t, log_g_t, state, *, scale=None) -> (o_t, state)

q, k, log_g: [B, T, H, K]; v: [B, T, H, V]; log_g <= 0 is the log forget gate (per key dim);
states [B, H, K, V] float32. Any T. impl:
  "reference": the token-by-token recurrence in f32 (lax.scan), the ground truth;
  "xla": the chunkwise form with secondary chunking (every exponent <= 0), the CPU default;
  "pallas": the kernels in pallas_kernels/gla (forward and backward, custom_vjp; TPU, and
            interpret mode on CPU);
  "auto": pallas on TPU, else xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "xla", "reference")
SUB_CHUNK = 8  # secondary chunk: diagonal blocks element-wise in log space (8: fastest on CPU)


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
        impl = "pallas" if jax.default_backend() == "tpu" and _pallas() else "xla"
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
        return kernel(q, k, v, log_g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
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


def _intra_chunk_scores(q, k, b, sub: int):
    """A_rs = sum_d q_rd k_sd exp(b_rd - b_sd) for r >= s within each chunk (GLA sec. 4.2).

    q, k, b: [..., C, K] (b = within-chunk cumsum of log_g, non-increasing in r). The chunk is cut
    into sub-chunks of `sub` rows: blocks below the diagonal are rebased on the first row b0 of
    the query sub-chunk, q e^(b - b0) and k e^(b0 - b), both exponents <= 0, and run as matmuls;
    diagonal blocks are computed element-wise with exponents b_r - b_s <= 0. Returns [..., C, C].
    """
    *lead, C, K = q.shape
    n = C // sub
    qs, ks, bs = (x.reshape(*lead, n, sub, K) for x in (q, k, b))
    b0 = bs[..., :1, :]                                             # [..., n, 1, K]
    q_reb = qs * jnp.exp(bs - b0)                                   # [..., n, c, K]
    below = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]         # query block I > key block J
    expo = b0[..., :, None, :, :] - bs[..., None, :, :, :]          # [..., nI, nJ, c, K]
    valid = below[:, :, None, None]
    k_reb = jnp.where(valid, ks[..., None, :, :, :] * jnp.exp(jnp.where(valid, expo, 0.0)), 0.0)
    a_off = jnp.einsum("...irk,...ijsk->...irjs", q_reb, k_reb)     # [..., nI, c, nJ, c]
    causal = jnp.tril(jnp.ones((sub, sub), bool))
    e = bs[..., :, :, None, :] - bs[..., :, None, :, :]             # [..., n, c_r, c_s, K]
    decay = jnp.exp(jnp.where(causal[:, :, None], e, -jnp.inf))
    a_diag = jnp.einsum("...nrk,...nsk,...nrsk->...nrs", qs, ks, decay)  # [..., n, c, c]
    eye = jnp.eye(n, dtype=q.dtype)
    a = a_off + eye[:, None, :, None] * a_diag[..., :, :, None, :]
    return a.reshape(*lead, C, C)


def gla_chunked(q, k, v, log_g, *, scale, initial_state=None, chunk_size=64):
    """The chunkwise-parallel form (GLA sec. 4): per chunk i, with b the within-chunk cumsum of
    log_g,  O = (Q e^b) S_[i] + A V  and  S_[i+1] = diag(e^(b_C)) S_[i] + (K e^(b_C - b))^T V.
    All chunks run in parallel; the chunk-state recurrence is an associative scan.
    Differentiable by autodiff; f32 inside. Returns (o in v's dtype, final state f32)."""
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    C = int(chunk_size)
    sub = min(SUB_CHUNK, C)
    if C < 1 or C % sub:
        raise ValueError(f"chunk_size must be a positive multiple of {SUB_CHUNK} (or <= it), "
                         f"got {chunk_size}")
    f32 = jnp.float32
    Tp = -(-T // C) * C
    pad = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
    # zero q, k, v and log_g = 0 leave the state unchanged: padding is exact
    q, k, v, log_g = (jnp.pad(x.astype(f32), pad) for x in (q, k, v, log_g))
    N = Tp // C

    def chunks(x):  # [B, Tp, H, D] -> [B, H, N, C, D]
        return x.reshape(B, N, C, H, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    qc, kc, vc, gc = chunks(q * scale), chunks(k), chunks(v), chunks(log_g)
    b = jnp.cumsum(gc, axis=-2)                                     # [B, H, N, C, K]
    b_last = b[..., -1:, :]                                         # [B, H, N, 1, K]
    # per-chunk state contributions and decays, then the sequential recurrence over chunks
    u = jnp.einsum("bhnck,bhncv->bhnkv", kc * jnp.exp(b_last - b), vc)
    log_d = b_last[..., 0, :]                                       # [B, H, N, K], <= 0

    # S_[i+1] = diag(d_i) S_[i] + U_i is a linear recurrence: an associative scan over chunks
    # (log2 N parallel levels instead of N sequential steps), pairs (log d, U) composed as
    # (la, Ua) then (lb, Ub) -> (la + lb, e^lb Ua + Ub); every exponent is <= 0
    def compose(a, b):
        (la, ua), (lb, ub) = a, b
        return la + lb, jnp.exp(lb)[..., None] * ua + ub

    log_cum, s_incl = jax.lax.associative_scan(compose, (log_d, u), axis=2)
    s_before = jnp.concatenate([jnp.zeros_like(s_incl[:, :, :1]), s_incl[:, :, :-1]], axis=2)
    s_final = s_incl[:, :, -1]
    if initial_state is not None:  # its decay up to each chunk: e^(sum of earlier log d)
        h0 = initial_state.astype(f32)[:, :, None]
        s_before = s_before + jnp.exp(log_cum - log_d)[..., None] * h0
        s_final = s_final + jnp.exp(log_cum[:, :, -1])[..., None] * h0[:, :, 0]
    if initial_state is None and N == 1:  # no state enters the only chunk
        o_inter = 0.0
    else:
        o_inter = jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(b), s_before)
    o_intra = jnp.einsum("bhnrs,bhnsv->bhnrv", _intra_chunk_scores(qc, kc, b, sub), vc)
    o = (o_inter + o_intra).transpose(0, 2, 3, 1, 4).reshape(B, Tp, H, V)[:, :T]
    return o.astype(out_dtype), s_final
