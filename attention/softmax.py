"""Softmax self-attention with grouped-query heads (GQA) and RoPE: the baseline mechanism.

softmax(Q K^T / sqrt(d_h)) V (Vaswani et al. 2017, eq. 1), with H query heads sharing
H_kv key/value heads (Ainslie et al. 2023) and rotary positions on q and k (`rope_theta` 0:
none). Causal by default (language models); `model.causal=False` attends to every token of the
segment (encoders: ViT, iFormer), for the mechanisms whose class says BIDIRECTIONAL.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from attention.ops.causal import IMPLS as CAUSAL_IMPLS, causal_attention
from attention.ops.rope import apply_rope, rope_scaling
from attention.registry import read_options, register
from attention.layers import Dense, dense, linear  # noqa: F401  (Dense, dense: re-exported)
from attention.sharding import constrain


MODES = ("train", "prefill", "decode")


def check_mode(mode: str, cache) -> None:
    """The self-attention call contract (attention.registry): a known mode, and a cache for
    prefill / decode."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'train', 'prefill' or 'decode', got {mode!r}")
    if mode != "train" and cache is None:
        raise ValueError(f"mode={mode!r} needs a cache (see init_cache)")


@register("softmax")
class SoftmaxAttention(nnx.Module):
    """x [B, T, D] -> [B, T, D]. Heads: num_heads query, num_kv_heads key/value (GQA)."""

    # config.model fields (attention/ops/causal.py), also of the mechanisms built on this layer
    # (attention.registry.read_options merges CONFIG_DEFAULTS along the class hierarchy)
    OPTION_PREFIX = "softmax"
    # softmax_bias: biases on the q/k/v/o projections (GPT-2 and ViT checkpoints have them;
    # Llama's and our own LMs' do not)
    CONFIG_DEFAULTS = dict(softmax_impl="auto", softmax_block=64, softmax_bias=False)
    OPTION_RULES = dict(softmax_impl=CAUSAL_IMPLS, softmax_block=">= 1")
    # honours model.causal=False (bidirectional attention, mode="train" only). A subclass
    # computes its scores its own way (sparse masks, routing), so it is causal-only unless its
    # own class body sets BIDIRECTIONAL = True (and handles self.causal): see __init_subclass__
    BIDIRECTIONAL = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.BIDIRECTIONAL = bool(cls.__dict__.get("BIDIRECTIONAL", False))

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = rope_scaling(cfg)  # Llama 3's, or None
        self.causal = bool(getattr(cfg, "causal", True))
        if not self.causal and not type(self).BIDIRECTIONAL:
            raise ValueError(f"{type(self).__name__} is causal only: model.causal=False needs a "
                             "mechanism whose class sets BIDIRECTIONAL = True")
        # attention/ops/causal.py: "auto" = query blocks skipping the masked half on CPU, the
        # dense (cuDNN / XLA) form elsewhere
        opts = read_options(type(self), cfg)  # this class's options and its subclass's
        self.softmax_impl = opts["softmax_impl"]
        self.softmax_block = opts["softmax_block"]
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        d, hd = cfg.d_model, self.head_dim
        out_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # GPT-2 scaled residual init
        proj = functools.partial(linear, bias=opts["softmax_bias"], dtype=dtype, rngs=rngs)
        self.q_proj = proj(d, self.num_heads * hd, ("embed", "heads"))
        self.k_proj = proj(d, self.num_kv_heads * hd, ("embed", "kv_heads"))
        self.v_proj = proj(d, self.num_kv_heads * hd, ("embed", "kv_heads"))
        self.o_proj = proj(self.num_heads * hd, d, ("heads", "embed"), std=out_std)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def attend(self, q, k, v, *, mode: str):
        """Causal self-attention of a whole segment (training, or a prompt at prefill), or full
        attention over it when not self.causal. q [B, T, H, hd], k, v [B, T, H_kv, hd] (RoPE
        applied) -> [B, T, H, hd]. Sparse mechanisms sharing these projections (so a trained
        softmax checkpoint loads into them) override this; decoding over the cache stays dense."""
        if not self.causal:
            return jax.nn.dot_product_attention(q, k, v)
        return causal_attention(q, k, v, block=self.softmax_block, impl=self.softmax_impl)

    def report_cost(self, pairs) -> None:
        """Sows the attention cost of a segment: (query, key) pairs computed for one sequence,
        summed over heads (nnx.Intermediate "attention_pairs"; bench/sparse.py reads it through
        nnx.capture, and outside a capture it is a no-op). Dense causal costs H T (T + 1) / 2."""
        self.sow(nnx.Intermediate, "attention_pairs", jnp.asarray(pairs, jnp.float32),
                 capture_noop=True)

    def __call__(self, x, *, positions, cache=None, mode: str = "train"):
        y, cache = self.head_outputs(x, positions=positions, cache=cache, mode=mode)
        B, T = x.shape[:2]
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim)), cache

    def project(self, x, mode: str):
        """x [B, T, D] -> q [B, T, H, hd], k, v [B, T, H_kv, hd] (before any rotation); a
        bidirectional layer refuses the cached modes."""
        if not self.causal and mode != "train":
            raise ValueError(f"mode={mode!r}: bidirectional attention (model.causal=False) has "
                             "no cache; call it with mode='train'")
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        return q, k, v

    def head_outputs(self, x, *, positions, cache=None, mode: str = "train"):
        """Every head's attention output before o_proj: x [B, T, D] -> (y [B, T, H, hd],
        cache). A mechanism that weighs heads (MoH) uses it and applies o_proj itself."""
        B, T, _ = x.shape
        q, k, v = self.project(x, mode)
        q = constrain(apply_rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling),
                      ("batch", "length", "act_heads", None))
        k = apply_rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling)

        if mode == "train":
            y = self.attend(q, k, v, mode=mode)
        elif mode in ("prefill", "decode"):
            if cache is None:
                raise ValueError(f"mode={mode!r} needs a cache (see init_cache)")
            # all sequences of a batch are at the same position (prompts have equal length)
            start = positions[0, 0]
            cache = {
                "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1),
                "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1),
            }
            if mode == "prefill":  # the prompt attends only to itself
                y = self.attend(q, k, v, mode=mode)
            else:
                key_pos = jnp.arange(cache["k"].shape[1])
                mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]
                y = jax.nn.dot_product_attention(q, cache["k"].astype(q.dtype),
                                                 cache["v"].astype(q.dtype), mask=mask[:, None])
        else:
            raise ValueError(f"mode must be 'train', 'prefill' or 'decode', got {mode!r}")
        return y, cache
