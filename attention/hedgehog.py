"""Hedgehog linear attention (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear
Attentions with Softmax Mimicry", ICLR 2024).

A trainable per-head feature map phi replaces exp(q k^T): attention weights become
phi(q_i) phi(k_j)^T, so causal attention runs as a linear recurrence with a constant-size state
(the generation cache). The map is learned by distilling a softmax teacher's attention weights.

Feature map (pinned: the lolcats variant, HazyResearch/lolcats `softmax_dim`):
    z = x W_h + b_h                (per head h; W_h initialised to the identity, b_h to 0)
    phi(x) = [softmax(z), softmax(-z)]   (each softmax over the feature dim; 2f features)
Attention (causal):
    y_i = phi(q_i) S_i / (phi(q_i) z_i),  S_i = sum_{j<=i} phi(k_j)^T v_j,  z_i = sum_{j<=i} phi(k_j)
Bidirectional (model.causal=False, the vision encoders): the sums run over every j, so S and z
are one [F, d] matrix and one [F] vector per head (Katharopoulos et al. 2020, eq. 4-5: linear
attention without a mask needs no recurrence).
Distillation (per layer): L = -mean_{b,h,i} sum_{j<=i} A_ij log Â_ij, A the teacher's causal
softmax attention and Â_ij = phi(q_i) phi(k_j)^T / sum_{l<=i} phi(q_i) phi(k_l)^T (in an
encoder, model.causal=False: every j, the unmasked softmax and Â).

Layer (`@register("hedgehog")`): the SoftmaxAttention call shape and projections (same names,
shapes and logical axes, so a softmax checkpoint's q/k/v/o transfer unchanged); RoPE is applied to
q and k before the feature maps; GQA repeats the k/v heads to the query heads *before* the key
feature map, so both feature maps (q and k) are per query head, and the state has num_heads heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layers import dense
from attention.ops.gla import gla, gla_step
from attention.ops.rope import apply_rope, rope_scaling
from attention.registry import read_options, register
from attention.sharding import constrain
from attention.softmax import check_mode

# added to the normaliser phi(q_i) z_i (> 0 in exact arithmetic; guards f32 underflow)
_DEN_EPS = 1e-12
# Â is clipped here before the log of the distillation loss (smallest normal f32)
_LOG_EPS = float(jnp.finfo(jnp.float32).tiny)


def _identity_init(key, shape, dtype=jnp.float32):
    """[H, d, f] stack of (rectangular) identities: z = x at initialisation when f == d."""
    del key
    h, d, f = shape
    return jnp.broadcast_to(jnp.eye(d, f, dtype=dtype), (h, d, f))


class HedgehogFeatureMap(nnx.Module):
    """Per-head trainable feature map [B, T, H, d] -> [B, T, H, 2f] (f32).

    phi(x) = concat[softmax(x W_h + b_h), softmax(-(x W_h + b_h))] over the f features
    (the lolcats `softmax_dim` variant of Hedgehog's map, Zhang et al. 2024). W: [H, d, f],
    initialised to the identity (training starts from a softmax-like map), b: [H, f] zeros.
    Logical axes ("heads", None, None) / ("heads", None): sharded over heads like q_proj.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, *,
                 use_bias: bool = True):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.feature_dim = feature_dim or head_dim
        shape = (num_heads, head_dim, self.feature_dim)
        w_init = nnx.with_partitioning(_identity_init, ("heads", None, None))
        self.w = nnx.Param(w_init(None, shape, jnp.float32))
        self.b = (nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("heads", None))(
            None, (num_heads, self.feature_dim), jnp.float32)) if use_bias else None)

    def __call__(self, x):
        if x.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"HedgehogFeatureMap expects [..., {self.num_heads}, {self.head_dim}], "
                             f"got {x.shape}")
        z = jnp.einsum("bthd,hdf->bthf", x.astype(jnp.float32), self.w[...])
        if self.b is not None:
            z = z + self.b[...]
        # Hedgehog (Zhang et al. 2024), lolcats normalisation: phi(x) = [softmax(xW+b), softmax(-xW-b)]
        return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)


def hedgehog_linear_attention(phi_q, phi_k, v, *, initial_state=None, output_final_state=False,
                              chunk_size: int = 64, impl: str = "auto"):
    """Causal normalised linear attention through the GLA op (log_g = 0, scale = 1).

    y_i = phi_q_i S_i / (phi_q_i z_i), S_i = S_0 + sum_{j<=i} phi_k_j^T v_j, z_i = z_0 + sum_{j<=i} phi_k_j.
    A ones column appended to v makes one GLA call give numerator (first d_v columns) and
    denominator (last column); the GLA state [B, H, F, d_v + 1] is (S, z) side by side.

    phi_q, phi_k: [B, T, H, F]; v: [B, T, H, d_v]. initial_state: None or {"S": [B, H, F, d_v],
    "z": [B, H, F]} (f32). Returns (y [B, T, H, d_v] f32, {"S", "z"} or None). A single token
    with a state (decoding) takes the one-step recurrence instead of the chunked form.
    """
    f32 = jnp.float32
    B, T, H, F = phi_q.shape
    dv = v.shape[-1]
    v1 = jnp.concatenate([v.astype(f32), jnp.ones((B, T, H, 1), f32)], axis=-1)
    s0 = None
    if initial_state is not None:
        s0 = jnp.concatenate([initial_state["S"].astype(f32),
                              initial_state["z"].astype(f32)[..., None]], axis=-1)
    if T == 1 and s0 is not None:
        o, s = gla_step(phi_q[:, 0].astype(f32), phi_k[:, 0].astype(f32), v1[:, 0],
                        jnp.zeros((B, H, F), f32), s0, scale=1.0)
        o = o[:, None]
    else:
        o, s = gla(phi_q.astype(f32), phi_k.astype(f32), v1, jnp.zeros((B, T, H, F), f32),
                   scale=1.0, initial_state=s0, output_final_state=output_final_state,
                   chunk_size=chunk_size, impl=impl, caller="Hedgehog")
    o = o.astype(f32)
    y = o[..., :dv] / (o[..., dv:] + _DEN_EPS)
    state = {"S": s[..., :dv], "z": s[..., dv]} if output_final_state else None
    return y, state


def hedgehog_bidirectional_attention(phi_q, phi_k, v):
    """Normalised linear attention over the whole sequence (no mask):
    y_i = phi_q_i (sum_j phi_k_j^T v_j) / (phi_q_i sum_j phi_k_j)  (Katharopoulos et al. eq. 5).
    phi_q, phi_k: [B, T, H, F]; v: [B, T, H, d_v]. Returns y [B, T, H, d_v] f32: O(T F d_v)."""
    f32 = jnp.float32
    phi_q, phi_k = phi_q.astype(f32), phi_k.astype(f32)
    kv = jnp.einsum("bjhf,bjhd->bhfd", phi_k, v.astype(f32))
    num = jnp.einsum("bihf,bhfd->bihd", phi_q, kv)
    den = jnp.einsum("bihf,bhf->bih", phi_q, jnp.sum(phi_k, axis=1))
    return num / (den[..., None] + _DEN_EPS)


def hedgehog_quadratic_attention(phi_q, phi_k, v, causal: bool = True):
    """The quadratic form: Â = rownorm(tril(phi_q phi_k^T)) (no tril when not causal), y = Â v
    (the reference, and what distillation needs). phi_q, phi_k: [B, T, H, F]; v: [B, T, H, d_v].
    Returns (y [B, T, H, d_v] f32, Â [B, H, T, T] f32; rows sum to 1, zero above the diagonal
    when causal)."""
    f32 = jnp.float32
    T = phi_q.shape[1]
    a = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(f32), phi_k.astype(f32))
    if causal:
        a = jnp.where(jnp.tril(jnp.ones((T, T), bool)), a, 0.0)
    a_hat = a / (a.sum(-1, keepdims=True) + _DEN_EPS)
    y = jnp.einsum("bhij,bjhd->bihd", a_hat, v.astype(f32))
    return y, a_hat


def distillation_loss(a_teacher, a_student, causal: bool = True):
    """Hedgehog's attention distillation: L = -mean_{b,h,i} sum_{j<=i} A_ij log Â_ij (every j
    when not causal).

    a_teacher (A), a_student (Â): [B, H, T, T] attention rows (each row a distribution over
    j <= i, or over every j). Â is clipped at the smallest normal f32 before the log; entries
    j > i are masked out when causal. L >= H(A) (Gibbs), with equality iff Â = A on A's
    support. f32 scalar."""
    f32 = jnp.float32
    T, S = a_teacher.shape[-2:]
    mask = jnp.tril(jnp.ones((T, S), bool)) if causal else jnp.ones((T, S), bool)
    log_a = jnp.log(jnp.maximum(a_student.astype(f32), _LOG_EPS))
    ce = jnp.where(mask, a_teacher.astype(f32) * log_a, 0.0)
    return -jnp.mean(jnp.sum(ce, axis=-1))


def softmax_attention_weights(q, k, causal: bool = True):
    """softmax(q k^T / sqrt(d)) in f32, causal or not. q, k: [B, T, H, d] -> [B, H, T, T]."""
    T, d = q.shape[1], q.shape[-1]
    s = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * d ** -0.5
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


@register("hedgehog")
class HedgehogAttention(nnx.Module):
    """x [B, T, D] -> [B, T, D]: SoftmaxAttention's projections with Hedgehog linear attention.

    Config (config.model): d_model, num_heads, num_kv_heads, head_dim, num_layers, rope_theta as
    for softmax; optional hedgehog_feature_dim (0/absent: head_dim) and hedgehog_distill
    (absent: False). With hedgehog_distill, mode="train" returns the softmax *teacher's* output
    (so the rest of the network sees what the pretrained model saw) and sows the distillation
    loss as nnx.Intermediate "aux_loss" (the teacher's A is a stop_gradient target; O(T^2)).
    Cache (prefill/decode): the recurrent state {"S": [B, H, 2f, head_dim], "z": [B, H, 2f]} f32.
    model.causal=False (encoders; mode="train" only): every token attends to every token, the
    unmasked sums computed once (hedgehog_bidirectional_attention), distilled from the
    unmasked softmax.
    """

    BIDIRECTIONAL = True

    OPTION_PREFIX = "hedgehog"
    CONFIG_DEFAULTS = dict(hedgehog_feature_dim=0,  # 0: head_dim
                           hedgehog_distill=False)
    OPTION_RULES = dict(hedgehog_feature_dim=">= 0")

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = rope_scaling(cfg)
        self.causal = bool(getattr(cfg, "causal", True))
        opt = read_options(type(self), cfg)
        self.distill = opt["hedgehog_distill"]
        self.feature_dim = opt["hedgehog_feature_dim"] or self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        d, hd = cfg.d_model, self.head_dim
        out_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # as SoftmaxAttention
        self.q_proj = dense(d, self.num_heads * hd, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k_proj = dense(d, self.num_kv_heads * hd, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.v_proj = dense(d, self.num_kv_heads * hd, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.o_proj = dense(self.num_heads * hd, d, ("heads", "embed"), dtype=dtype, rngs=rngs,
                            std=out_std)
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, hd, self.feature_dim)
        self.feature_map_k = HedgehogFeatureMap(self.num_heads, hd, self.feature_dim)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """The recurrent state (constant size: max_len and dtype are not needed; kept f32)."""
        del max_len, dtype
        F = 2 * self.feature_dim
        return {"S": jnp.zeros((batch, self.num_heads, F, self.head_dim), jnp.float32),
                "z": jnp.zeros((batch, self.num_heads, F), jnp.float32)}

    def __call__(self, x, *, positions, cache=None, mode: str = "train"):
        check_mode(mode, cache)
        if not self.causal and mode != "train":
            raise ValueError(f"hedgehog with model.causal=False (an encoder) runs mode='train' "
                             f"only, got {mode!r}: a bidirectional layer has no recurrent cache")
        B, T, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, hd)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, hd)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, hd)
        q = constrain(apply_rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling),
                      ("batch", "length", "act_heads", None))
        k = apply_rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling)
        rep = H // self.num_kv_heads  # GQA: query head h reads kv head h // rep
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(k)

        if mode == "train" and self.distill:
            a_teacher = softmax_attention_weights(q, k, self.causal)
            y = jnp.einsum("bhij,bjhd->bihd", a_teacher, v.astype(jnp.float32))
            _, a_student = hedgehog_quadratic_attention(phi_q, phi_k, v, self.causal)
            self.sow(nnx.Intermediate, "aux_loss", distillation_loss(
                jax.lax.stop_gradient(a_teacher), a_student, self.causal))
        elif mode == "train" and not self.causal:
            y = hedgehog_bidirectional_attention(phi_q, phi_k, v)
        elif mode == "train":
            y, _ = hedgehog_linear_attention(phi_q, phi_k, v)
        else:
            y, cache = hedgehog_linear_attention(phi_q, phi_k, v, initial_state=cache,
                                                 output_final_state=True)
        y = y.astype(x.dtype).reshape(B, T, H * hd)
        return self.o_proj(y), cache
