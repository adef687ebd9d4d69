"""Gated linear attention (GLA) as Pallas kernels, forward and backward (Yang et al., 2024).

`gla_pallas` takes the [B, T, H, D] layout of attention/ops, moves to the kernels' [B, H, T, D]
layout, pads T to a multiple of the chunk and calls `kernels.gla_core` (a `jax.custom_vjp` whose
backward is made of explicit kernels). The math of each kernel is in kernels.py's docstring.
"""
from __future__ import annotations


import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.gla.kernels import Config, gla_core

__all__ = ["gla_pallas"]


def gla_pallas(q, k, v, log_g, *, scale: float, initial_state=None,
               output_final_state: bool = False, chunk_size: int = 64,
               interpret: bool | None = None):
    """q, k, log_g: [B, T, H, K]; v: [B, T, H, V]; log_g <= 0 (log forget gate, per key dim).
    Recurrence: S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t ;  o_t = (scale * q_t) S_t.
    initial_state / final state: [B, H, K, V] float32 (None = zeros).
    Returns (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] f32 or None)."""
    bs, t, hs, kd = q.shape
    vd = v.shape[-1]
    if k.shape != q.shape or log_g.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla_pallas: shapes q{q.shape} k{k.shape} v{v.shape} "
                         f"log_g{log_g.shape} do not match [B, T, H, K] / [B, T, H, V]")
    if chunk_size < 8 or chunk_size % 8:
        raise ValueError(f"gla_pallas: chunk_size must be a positive multiple of 8, "
                         f"got {chunk_size}")
    if interpret is None:
        interpret = platform.interpret_default()
    sub = 16 if chunk_size % 16 == 0 else 8
    cfg = Config(scale=float(scale), chunk=int(chunk_size), sub=sub, interpret=bool(interpret))

    t_pad = -(-t // chunk_size) * chunk_size

    def to_kernel_layout(x):
        # Padding with q = k = v = 0 and log_g = 0 leaves the state unchanged.
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, 0))) if t_pad != t else x

    if initial_state is None:
        h0 = jnp.zeros((bs, hs, vd, kd), jnp.float32)
    else:
        h0 = jnp.swapaxes(initial_state.astype(jnp.float32), -1, -2)
    o, final = gla_core(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v),
                        to_kernel_layout(log_g.astype(jnp.float32)), h0, cfg)
    o = jnp.transpose(o[:, :, :t], (0, 2, 1, 3))
    return o, (jnp.swapaxes(final, -1, -2) if output_final_state else None)
