"""Gated linear attention (GLA) as Pallas kernels, forward and backward (Yang et al., 2024).

`gla_pallas` takes the [B, T, H, D] layout of attention/ops, moves to the kernels' [B, H, T, D]
layout, pads T to a multiple of the chunk and calls `kernels.gla_core` (a `jax.custom_vjp` whose
backward is made of explicit kernels). The math of each kernel is in kernels.py's docstring.

TPU (and interpret mode): four kernels, two of them carrying the chunk state over a sequential
grid axis. GPU (Triton): the GPU lowering has no sequential grid axis, so the two chunk-state
recurrences are kernels that loop over the chunks inside one program per (batch, head, block of
value rows) (`Config.state_pass="loop"`), between the same two parallel kernels (outputs; input
gradients); head dims are zero-padded to powers of two >= 16 (Triton's block and dot shapes),
which is exact.
"""
from __future__ import annotations


import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.gla.kernels import Config, gla_core

__all__ = ["gla_pallas"]


def _gpu_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def gla_pallas(q, k, v, log_g, *, scale: float, initial_state=None,
               output_final_state: bool = False, chunk_size: int = 64,
               interpret: bool | None = None, gpu: bool | None = None):
    """q, k, log_g: [B, T, H, K]; v: [B, T, H, V]; log_g <= 0 (log forget gate, per key dim).
    Recurrence: S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t ;  o_t = (scale * q_t) S_t.
    initial_state / final state: [B, H, K, V] float32 (None = zeros).
    gpu: the GPU arrangement (looping state passes, padded head dims); None: on a GPU backend. The
    tests run it in interpret mode on CPU.
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
    if gpu is None:
        gpu = not interpret and platform.is_gpu()
    sub = 16 if chunk_size % 16 == 0 else 8
    if gpu and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"gla_pallas on GPU: chunk_size must be a power of two >= 16 (Triton's "
                         f"tensor and dot shapes), got {chunk_size}")
    kp, vp = (_gpu_dim(kd), _gpu_dim(vd)) if gpu else (kd, vd)
    cfg = Config(scale=float(scale), chunk=int(chunk_size), sub=sub, interpret=bool(interpret),
                 state_pass="loop" if gpu else "kernel", dims=(kd, vd))
    if (kp, vp) != (kd, vd):
        # zero key dims add nothing to q k^T; zero value dims give zero outputs: exact
        pad = lambda x, p: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, p)])  # noqa: E731
        q, k, log_g = (pad(x, kp - kd) for x in (q, k, log_g))
        v = pad(v, vp - vd)
        if initial_state is not None:
            initial_state = jnp.pad(initial_state, [(0, 0), (0, 0), (0, kp - kd), (0, vp - vd)])

    t_pad = -(-t // chunk_size) * chunk_size

    def to_kernel_layout(x):
        # Padding with q = k = v = 0 and log_g = 0 leaves the state unchanged.
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, 0))) if t_pad != t else x

    if initial_state is None:
        h0 = jnp.zeros((bs, hs, vp, kp), jnp.float32)
    else:
        h0 = jnp.swapaxes(initial_state.astype(jnp.float32), -1, -2)
    o, final = gla_core(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v),
                        to_kernel_layout(log_g.astype(jnp.float32)), h0, cfg)
    o = jnp.transpose(o[:, :, :t, :vd], (0, 2, 1, 3))
    final = jnp.swapaxes(final, -1, -2)[:, :, :kd, :vd]
    return o, (final if output_final_state else None)
