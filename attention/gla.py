"""The gated linear attention layer (Yang et al., ICML 2024; the fla `GatedLinearAttention` layout).

    q = x W_q, k = x W_k  (expand_k = 0.5: key dim d/2), v = x W_v (expand_v = 1)
    log forget gate  g = logsigmoid(x W_1 W_2 + b) / 16   (low rank 16; the /16 normaliser)
    o = GLA(q, k, v, g)   (attention.ops.gla: S_t = diag(e^g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t)
    y = W_o (RMSNorm(o) * swish(x W_r))   (per-head RMSNorm, swish output gate)

No positional encoding: the decaying state orders the tokens. Decoding keeps the recurrent state
[B, H, K, V] as the cache, so generation costs O(1) per token whatever the context length.

Bidirectional (model.causal=False: the vision encoders, mode="train" only). The gate is
directional, so an encoder reads the sequence both ways with the same q, k, v and gates and sums
the two, the current token counted once (the bidirectional reading of vision linear-attention
models such as ViG and Vision-RWKV):
    o = GLA(q, k, v, g) + flip(GLA(flip q, flip k, flip v, flip g)) - scale (q_t . k_t) v_t
so key j reaches query i with decay prod_{m=j+1..i} e^{g_m} (j <= i) or prod_{m=i..j-1} e^{g_m}
(j > i). Over image patches in raster order the decay follows that order: rows are read as one
long line, as in those models.

Config fields (config.model; defaults used when absent): num_heads, d_model, gla_expand_k (0.5),
gla_expand_v (1.0), gla_gate_rank (16), gla_gate_norm (16.0), gla_chunk (64), gla_impl ("auto").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layers import dense
from attention.ops.gla import IMPLS as GLA_IMPLS, gla, gla_step
from attention.registry import read_options, register
from attention.sharding import constrain


def bidirectional_gla(q, k, v, log_g, *, chunk_size: int = 64, impl: str = "auto"):
    """Both directions of GLA summed, the diagonal once (module docstring):
    o_i = sum_j (scale q_i . (k_j * decay_ij)) v_j over every j. Shapes as attention.ops.gla.gla;
    returns o [B, T, H, V] in v's dtype."""
    flip = lambda a: jnp.flip(a, axis=1)  # noqa: E731
    forward, _ = gla(q, k, v, log_g, chunk_size=chunk_size, impl=impl, caller="GLA")
    backward, _ = gla(flip(q), flip(k), flip(v), flip(log_g), chunk_size=chunk_size, impl=impl,
                      caller="GLA")
    f32 = jnp.float32
    scale = q.shape[-1] ** -0.5  # the op's default, which both calls use
    diagonal = scale * jnp.sum(q.astype(f32) * k.astype(f32), -1, keepdims=True) * v.astype(f32)
    return (forward.astype(f32) + flip(backward).astype(f32) - diagonal).astype(v.dtype)


@register("gla")
class GatedLinearAttention(nnx.Module):
    """x [B, T, D] -> [B, T, D] with num_heads heads of key dim D*expand_k/H, value D*expand_v/H."""

    # honours model.causal=False: both directions summed (module docstring)
    BIDIRECTIONAL = True
    # fla GatedLinearAttention defaults, added to config.model when model.attention = "gla"
    OPTION_PREFIX = "gla"
    CONFIG_DEFAULTS = dict(gla_expand_k=0.5, gla_expand_v=1.0, gla_gate_rank=16,
                           gla_gate_norm=16.0, gla_chunk=64, gla_impl="auto")
    OPTION_RULES = dict(gla_expand_k="> 0", gla_expand_v="> 0", gla_gate_rank=">= 1",
                        gla_gate_norm="> 0", gla_chunk=">= 1", gla_impl=GLA_IMPLS)

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, H = cfg.d_model, cfg.num_heads
        opt = read_options(type(self), cfg)
        key_dim = int(d * opt["gla_expand_k"])
        value_dim = int(d * opt["gla_expand_v"])
        if key_dim % H or value_dim % H:
            raise ValueError(f"gla: key dim {key_dim} and value dim {value_dim} (d_model={d} x "
                             f"expand_k / expand_v) must be divisible by num_heads={H}")
        self.num_heads, self.head_k, self.head_v = H, key_dim // H, value_dim // H
        self.gate_norm = opt["gla_gate_norm"]
        self.chunk = opt["gla_chunk"]
        self.impl = opt["gla_impl"]
        self.causal = bool(getattr(cfg, "causal", True))
        rank = opt["gla_gate_rank"]
        out_std = 0.02 / (2 * cfg.num_layers) ** 0.5
        self.q_proj = dense(d, key_dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k_proj = dense(d, key_dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v_proj = dense(d, value_dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.g_down = dense(d, rank, ("embed", None), dtype=dtype, rngs=rngs)
        self.g_up = nnx.Linear(
            rank, key_dim, use_bias=True, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "heads")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("heads",)), rngs=rngs)
        self.r_proj = dense(d, value_dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o_norm = nnx.RMSNorm(
            self.head_v, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
            scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)), rngs=rngs)
        self.o_proj = dense(value_dim, d, ("heads", "embed"), dtype=dtype, rngs=rngs, std=out_std)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """The recurrent state (f32 whatever the compute dtype); max_len is not needed."""
        return {"S": jnp.zeros((batch, self.num_heads, self.head_k, self.head_v), jnp.float32)}

    def __call__(self, x, *, positions=None, cache=None, mode: str = "train"):
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).reshape(B, T, H, self.head_k)
        k = self.k_proj(x).reshape(B, T, H, self.head_k)
        v = self.v_proj(x).reshape(B, T, H, self.head_v)
        q = constrain(q, ("batch", "length", "act_heads", None))
        # g = logsigmoid(x W1 W2 + b) / 16 (GLA sec. 4.4, fla gate_logit_normalizer)
        log_g = (jax.nn.log_sigmoid(self.g_up(self.g_down(x)).astype(jnp.float32))
                 / self.gate_norm).reshape(B, T, H, self.head_k)
        if not self.causal:
            if mode != "train":
                raise ValueError(f"gla with model.causal=False (an encoder) runs mode='train' "
                                 f"only, got {mode!r}: a bidirectional layer has no cache")
            o = bidirectional_gla(q, k, v, log_g, chunk_size=self.chunk, impl=self.impl)
        elif mode == "train":
            o, _ = gla(q, k, v, log_g, chunk_size=self.chunk, impl=self.impl, caller="GLA")
        elif mode in ("prefill", "decode"):
            if cache is None:
                raise ValueError(f"mode={mode!r} needs a cache (see init_cache)")
            if T == 1:
                o, s = gla_step(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], cache["S"])
                o = o[:, None]
            else:
                o, s = gla(q, k, v, log_g, initial_state=cache["S"], output_final_state=True,
                           chunk_size=self.chunk, impl=self.impl, caller="GLA")
            cache = {"S": s}
        else:
            raise ValueError(f"mode must be 'train', 'prefill' or 'decode', got {mode!r}")
        gate = jax.nn.silu(self.r_proj(x)).reshape(B, T, H, self.head_v)
        y = (self.o_norm(o) * gate).reshape(B, T, H * self.head_v)
        return self.o_proj(y), cache
