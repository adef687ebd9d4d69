"""Rotary position embedding (RoFormer, Su et al. 2021)."""
import jax.numpy as jnp


def apply_rope(x, positions, *, theta: float = 10000.0):
    """Rotates pairs (x[..., :D/2], x[..., D/2:]) by angle pos * theta^(-2i/D).

    x: [B, T, H, D] (D even); positions: [B, T] int. Computed in f32, returned in x.dtype.
    theta = 0 turns RoPE off (x unchanged): models with learned absolute positions.
    """
    if not theta:
        return x
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    # RoFormer eq. (34): theta_i = 10000^(-2(i-1)/d)
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
