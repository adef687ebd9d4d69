"""ComplexFormer: complex multi-head attention, CMHA (Shao et al., 2025; reference code:
shaojintian/complexFormer attention/complex_attention.py; PAPERS.md "ComplexFormer").

Each head's d_h dims are read as d_h / 2 complex numbers, real parts the first half and imaginary
parts the second (the half-split layout of attention/ops/rope.py): q_mj = r^q_mj e^{i theta^q_mj}.
The score of query m and key n in head h is
    s_mn = sum_j r^q_mj r^k_nj cos(delta_hj (theta^q_mj - theta^k_nj) + b_hj + (m - n) g_j)
with g_j = rope_theta^(-2j / d_h) (RoPE's frequencies), delta [H, d_h/2] learnable (init 1) and
b [H, d_h/2] learnable (init 0); y = softmax(s / sqrt(d_h)) V, causal or (model.causal=False)
bidirectional.

Factorisation (how it is computed): the cosine of a difference of phases is the real part of a
product with a conjugate, so
    s_mn = Re sum_j [r^q_mj e^{i(delta_hj theta^q_mj + b_hj + m g_j)}]
                    * conj[r^k_nj e^{i(delta_hj theta^k_nj + n g_j)}]
         = q~_m . k~_n,   q~ = (r cos phi^q, r sin phi^q), k~ = (r cos phi^k, r sin phi^k)
(real dot product over the d_h concatenated real/imaginary parts): each query and key is
rotated once, like RoPE, and the score is a plain matmul. No [T, T, d_h/2] tensor is ever
formed; the [T, T] scores go through attention/ops/causal.py (query blocks of `softmax_block`
rows on CPU, flash-style backward), so T = 2048 runs in O(T * block) score memory; the
bidirectional path is jax.nn.dot_product_attention. With delta = 1, b = 0, q~ and k~ are exactly
RoPE(q), RoPE(k) (r e^{i theta} = re + i im), i.e. softmax attention with RoPE.

Keys: delta is per query head, so with grouped-query heads (num_kv_heads < num_heads) each key
head is rotated once per query head of its group (k~ is [B, T, H, d_h]). The cache (prefill /
decode) holds the raw keys and values (H_kv heads, as SoftmaxAttention: a cache entry's index
is its position); decoding rotates the cached keys with the current delta at each step.
rope_theta = 0: no position term (g = 0), e.g. a ViT with learned absolute positions.
Where q or k is exactly 0 the phase is undefined: it is taken as 0 and the gradient of r there
as 0 (a double `where`, so no NaN).

Same q/k/v/o projections as SoftmaxAttention (a softmax checkpoint loads); delta and b are new.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.registry import register
from attention.softmax import SoftmaxAttention, check_mode
from attention.sharding import constrain


def polar(x):
    """x [..., d] (half-split: real parts, then imaginary parts) -> (r, theta) [..., d/2] f32."""
    re, im = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    r2 = re * re + im * im
    nz = r2 > 0
    # double where: finite values and gradients where q_j = 0
    r = jnp.where(nz, jnp.sqrt(jnp.where(nz, r2, 1.0)), 0.0)
    theta = jnp.arctan2(jnp.where(nz, im, 0.0), jnp.where(nz, re, 1.0))
    return r, theta


def complex_features(x, positions, delta, bias=None, *, theta: float = 10000.0):
    """The rotated features of the factorised CMHA score.

    x [B, T, H, d] (d even), positions [B, T] int, delta [H, d/2], bias [H, d/2] or None (keys)
    -> [B, T, H, d] f32: (r cos phi, r sin phi), phi = delta * theta_x + bias + pos * g."""
    d = x.shape[-1]
    r, ang = polar(x)
    phase = delta.astype(jnp.float32) * ang                    # delta_hj theta_mj
    if bias is not None:
        phase = phase + bias.astype(jnp.float32)               # + b_hj (query side)
    if theta:
        g = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)  # g_j (RoFormer eq. 34)
        phase = phase + positions.astype(jnp.float32)[:, :, None, None] * g  # + m g_j
    # Shao et al. 2025 CMHA score r^q r^k cos(delta (theta^q - theta^k) + b + (m - n) g) =
    # Re[q~ conj(k~)] = q~ . k~ with these features (module docstring)
    return jnp.concatenate([r * jnp.cos(phase), r * jnp.sin(phase)], axis=-1)


def _expand_heads(x, num_heads: int):
    """[B, T, H_kv, d] -> [B, T, H, d]: query head h reads key/value head h // (H / H_kv)."""
    g = num_heads // x.shape[2]
    return x if g == 1 else jnp.repeat(x, g, axis=2)


def cmha_scores_reference(q, k, delta, bias, *, theta: float = 10000.0, positions=None):
    """The paper's score written plainly, per (m, n, j) (tests): q [B, T, H, d], k [B, S, H, d]
    -> s [B, H, T, S] (unscaled), positions arange when None."""
    B, T, H, d = q.shape
    S = k.shape[1]
    rq, tq = polar(q)
    rk, tk = polar(k)
    m = jnp.arange(T, dtype=jnp.float32) if positions is None else positions.astype(jnp.float32)
    n = jnp.arange(S, dtype=jnp.float32)
    g = (theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)) if theta else \
        jnp.zeros((d // 2,), jnp.float32)
    # [B, T, S, H, d/2]: delta_hj (theta^q_mj - theta^k_nj) + b_hj + (m - n) g_j
    arg = (delta * (tq[:, :, None] - tk[:, None]) + bias
           + (m[:, None] - n[None, :])[None, :, :, None, None] * g)
    s = jnp.sum(rq[:, :, None] * rk[:, None] * jnp.cos(arg), axis=-1)
    return jnp.transpose(s, (0, 3, 1, 2))


@register("complexformer")
class ComplexFormerAttention(SoftmaxAttention):
    """x [B, T, D] -> [B, T, D]: complex multi-head attention (module docstring). Parameters:
    SoftmaxAttention's + delta [H, d_h/2] (init 1) and phase_bias [H, d_h/2] (b, init 0)."""

    BIDIRECTIONAL = True

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        if self.rope_scaling is not None:
            raise ValueError("complexformer: config.model.rope_scaling must be '' (its phases use "
                             "the plain RoPE frequencies)")
        if self.head_dim % 2:
            raise ValueError(f"complexformer: head_dim={self.head_dim} must be even (real and "
                             "imaginary halves)")
        shape = (self.num_heads, self.head_dim // 2)
        self.delta = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("heads", None))(
            None, shape, jnp.float32))
        self.phase_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("heads", None))(
            None, shape, jnp.float32))

    def rotate_queries(self, q, positions):
        return complex_features(q, positions, self.delta[...], self.phase_bias[...],
                                theta=self.rope_theta)

    def rotate_keys(self, k, positions):
        return complex_features(_expand_heads(k, self.num_heads), positions, self.delta[...],
                                theta=self.rope_theta)

    def __call__(self, x, *, positions, cache=None, mode: str = "train"):
        check_mode(mode, cache)
        B, T, _ = x.shape
        q, k, v = self.project(x, mode)
        qt = constrain(self.rotate_queries(q, positions).astype(q.dtype),
                       ("batch", "length", "act_heads", None))

        if mode != "train":  # cache the raw keys (delta may differ per query head of a group)
            start = positions[0, 0]
            cache = {
                "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1),
                "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1),
            }
        if mode == "decode":
            S = cache["k"].shape[1]
            key_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            kt = self.rotate_keys(cache["k"], key_pos).astype(q.dtype)
            mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
            vv = _expand_heads(cache["v"].astype(q.dtype), self.num_heads)
            y = jax.nn.dot_product_attention(qt, kt, vv, mask=mask[:, None])
        else:  # train, or a prompt at prefill attending to itself
            kt = self.rotate_keys(k, positions).astype(q.dtype)
            y = self.attend(qt, kt, _expand_heads(v, self.num_heads), mode=mode)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim)), cache
