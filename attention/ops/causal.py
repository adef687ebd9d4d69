"""Causal softmax attention: softmax(q k^T / sqrt(d) + M) v with M = -inf above the diagonal
(Vaswani et al. 2017, eq. 1). Public API:

    causal_attention(q, k, v, *, scale=None, block=128, impl="auto") -> o

q: [B, T, H, D]; k, v: [B, T, H_kv, D] (H a multiple of H_kv: grouped-query heads); o like q.
impl:
  "dense":   jax.nn.dot_product_attention(is_causal=True): the full T x T scores, masked (cuDNN
             flash attention on GPU, XLA elsewhere);
  "blocked": query blocks of `block` rows, each against only the keys at or before its last
             row, so the fully masked blocks above the diagonal are never computed (about
             (n + 1) / 2n of the dense work for n blocks) and every exponent is of a real score;
             the backward is the explicit flash-attention one (custom VJP from the saved
             log-sum-exp, no stored probabilities);
  "auto":    "blocked" on CPU for T > block, else "dense".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform

IMPLS = ("auto", "dense", "blocked")
_HI = jax.lax.Precision.DEFAULT


def causal_attention(q, k, v, *, scale=None, block: int = 128, impl: str = "auto"):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"causal_attention: q [B, T, H, D] and k, v [B, T, H_kv, D] with H a "
                         f"multiple of H_kv; got q {q.shape}, k {k.shape}, v {v.shape}")
    if block < 1:
        raise ValueError(f"causal_attention: block must be >= 1, got {block}")
    T = q.shape[1]
    if impl == "auto":
        impl = "blocked" if platform.backend() == "cpu" and T > block else "dense"
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "dense":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return _blocked(q, k, v, scale, min(block, T))


def _split(q, k, v):
    """[B, T, H, D] -> q [B, H_kv, G, T, D], k / v [B, H_kv, T, D] (G = H / H_kv)."""
    B, T, H, D = q.shape
    hk = k.shape[2]
    q = jnp.transpose(q.reshape(B, T, hk, H // hk, D), (0, 2, 3, 1, 4))
    return q, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def _bounds(T: int, block: int):
    """(start, end) of each query block; its keys are [0, end)."""
    return [(s, min(s + block, T)) for s in range(0, T, block)]


def _diag_mask(s0: int, s1: int):
    """[rows, keys] True where key <= query, for query rows s0..s1-1 over keys 0..s1-1."""
    return jnp.arange(s1)[None, :] <= jnp.arange(s0, s1)[:, None]


def _forward(q, k, v, scale, block):
    """q [B, Hk, G, T, D]; k, v [B, Hk, T, D] -> (o like q, lse [B, Hk, G, T] f32)."""
    outs, lses = [], []
    for s0, s1 in _bounds(q.shape[3], block):
        s = jnp.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, s0:s1], k[:, :, :s1],
                       preferred_element_type=jnp.float32) * scale
        s = jnp.where(_diag_mask(s0, s1), s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhgqk,bhkd->bhgqd", (p / l).astype(v.dtype), v[:, :, :s1],
                       preferred_element_type=jnp.float32)
        outs.append(o.astype(q.dtype))
        lses.append((m + jnp.log(l))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_core(q, k, v, scale, block):
    return _forward(q, k, v, scale, block)[0]


def _core_fwd(q, k, v, scale, block):
    o, lse = _forward(q, k, v, scale, block)
    return o, (q, k, v, o, lse)


def _core_bwd(scale, block, res, do):
    """Flash-attention backward per query block (Dao et al. 2022, alg. 4): P = exp(S - lse),
    dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K scale, dK = dS^T Q scale, dV = P^T dO."""
    q, k, v, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, Hk, G, T]
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for s0, s1 in _bounds(q.shape[3], block):
        qb, dob = q[:, :, :, s0:s1], do[:, :, :, s0:s1]
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, k[:, :, :s1],
                       preferred_element_type=jnp.float32) * scale
        p = jnp.where(_diag_mask(s0, s1), jnp.exp(s - lse[:, :, :, s0:s1, None]), 0.0)
        dv = dv.at[:, :, :s1].add(jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(do.dtype), dob,
                                             preferred_element_type=jnp.float32))
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, v[:, :, :s1], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, :, s0:s1, None]) * scale).astype(q.dtype)
        dq_blocks.append(jnp.einsum("bhgqk,bhkd->bhgqd", ds, k[:, :, :s1],
                                    preferred_element_type=jnp.float32).astype(q.dtype))
        dk = dk.at[:, :, :s1].add(jnp.einsum("bhgqk,bhgqd->bhkd", ds, qb,
                                             preferred_element_type=jnp.float32))
    return (jnp.concatenate(dq_blocks, axis=3), dk.astype(k.dtype), dv.astype(v.dtype))


_blocked_core.defvjp(_core_fwd, _core_bwd)


def _blocked(q, k, v, scale, block):
    B, T, H, D = q.shape
    qs, ks, vs = _split(q, k, v)
    o = _blocked_core(qs, ks, vs, scale, block)  # [B, Hk, G, T, D]
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, D)
