"""Rotary position embedding (RoFormer, Su et al. 2021), with Llama 3's frequency scaling."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

ROPE_SCALINGS = ("", "llama3")


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (Meta's `apply_scaling`; Hugging Face's rope_type
    "llama3"): wavelengths longer than original_max_len / low_freq_factor are stretched by
    `factor`, those shorter than original_max_len / high_freq_factor are kept, and the band
    between is interpolated linearly in original_max_len / wavelength."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __call__(self, inv_freq):
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = self.original_max_len / self.low_freq_factor
        high_wavelen = self.original_max_len / self.high_freq_factor
        smooth = ((self.original_max_len / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor))
        mid = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = jnp.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        return jnp.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, out)


def rope_scaling(cfg) -> Llama3Scaling | None:
    """The frequency scaling a model config asks for: config.model.rope_scaling "" (none) or
    "llama3" with rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor and
    rope_original_max_len; a config without the fields has none."""
    kind = getattr(cfg, "rope_scaling", "") or ""
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"config.model.rope_scaling={kind!r}; allowed: "
                         f"{', '.join(map(repr, ROPE_SCALINGS))}")
    if not kind:
        return None
    return Llama3Scaling(float(cfg.rope_scaling_factor), float(cfg.rope_low_freq_factor),
                         float(cfg.rope_high_freq_factor), int(cfg.rope_original_max_len))


def rope_frequencies(d: int, theta: float, scaling: Llama3Scaling | None = None):
    """inv_freq [d/2] f32: theta^(-2i/d) (RoFormer eq. 34), then `scaling`."""
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    return inv_freq if scaling is None else scaling(inv_freq)


def apply_rope(x, positions, *, theta: float = 10000.0, scaling: Llama3Scaling | None = None):
    """Rotates pairs (x[..., :D/2], x[..., D/2:]) by angle pos * inv_freq_i (rope_frequencies:
    theta^(-2i/D), optionally Llama 3 scaled), the layout of Hugging Face's Llama.

    x: [B, T, H, D] (D even); positions: [B, T] int. Computed in f32, returned in x.dtype.
    theta = 0 turns RoPE off (x unchanged): models with learned absolute positions.
    """
    if not theta:
        return x
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    inv_freq = rope_frequencies(d, theta, scaling)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
