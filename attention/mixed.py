"""MixFormer's asymmetric mixed attention (Cui et al., CVPR 2022, §3.2; MCG-NJU/MixFormer
lib/models/mixformer_vit/mixformer.py `Attention.forward`).

One attention layer both extracts features and mixes template and search: over the
concatenation [template; search] with shared projections,
    O_t = softmax(Q_t K_t^T / sqrt(d_h)) V_t                      template queries, template keys
    O_s = softmax(Q_s [K_t; K_s]^T / sqrt(d_h)) [V_t; V_s]        search queries, all keys
Template tokens never read the search, so at inference the templates' keys and values of every
layer are computed once (`encode_template` / `template_kv`, the reference's `set_online`) and
each new search frame only runs `search_with_cache` (`forward_test`). Computed as two attention
calls over Nt and Nt + Ns keys: no (Nt + Ns)^2 masked score matrix.

This is MixFormer's own mechanism with its own call shape (two streams in, two out), so it is
imported by models/mixformer/model.py directly rather than built through attention.registry, whose
modules share the self-attention shape. Layout [batch, seq, heads, head_dim].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layers import dense
from attention.sharding import constrain


class MixedAttention(nnx.Module):
    """template [B, Nt, D], search [B, Ns, D] -> (template_out [B, Nt, D], search_out [B, Ns, D]).

    Nt = num_templates x tokens per template (all templates attend to each other, as in the
    reference); H = num_heads query / key / value heads of d_h = D / H channels. Projections
    are bias-free, like the library's softmax attention (a key bias cancels in the softmax);
    `out_std` is o_proj's init std (a deep stack scales it down, GPT-2 style)."""

    def __init__(self, d_model: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 out_std: float = 0.02):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        d = d_model
        with nnx.use_eager_sharding(False):  # logical axes only; the trainer shards later
            self.q_proj = dense(d, d, ("embed", "heads"), dtype=dtype, rngs=rngs)
            self.k_proj = dense(d, d, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
            self.v_proj = dense(d, d, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
            self.o_proj = dense(d, d, ("heads", "embed"), dtype=dtype, rngs=rngs, std=out_std)

    def _heads(self, x):
        """[B, N, D] -> [B, N, H, d_h]."""
        return x.reshape(*x.shape[:2], self.num_heads, self.head_dim)

    def _out(self, o):
        """[B, N, H, d_h] -> W_o concat_h(o_h): [B, N, D]."""
        return self.o_proj(o.reshape(*o.shape[:2], self.num_heads * self.head_dim))

    def _query(self, x):
        return constrain(self._heads(self.q_proj(x)), ("batch", "length", "act_heads", None))

    def template_kv(self, template):
        """template [B, Nt, D] -> (K_t, V_t), each [B, Nt, H, d_h]: the per-layer template cache."""
        return self._heads(self.k_proj(template)), self._heads(self.v_proj(template))

    def encode_template(self, template):
        """template [B, Nt, D] -> (template_out [B, Nt, D], (K_t, V_t)).

        The template stream alone: it never depends on the search tokens."""
        k_t, v_t = self.template_kv(template)
        # O_t = softmax(Q_t K_t^T / sqrt(d_h)) V_t
        o_t = jax.nn.dot_product_attention(self._query(template), k_t, v_t)
        return self._out(o_t), (k_t, v_t)

    def search_with_cache(self, search, k_t, v_t):
        """search [B, Ns, D], cached K_t, V_t [B, Nt, H, d_h] -> search_out [B, Ns, D]."""
        k_s, v_s = self.template_kv(search)
        k = jnp.concatenate([k_t.astype(k_s.dtype), k_s], axis=1)
        v = jnp.concatenate([v_t.astype(v_s.dtype), v_s], axis=1)
        # O_s = softmax(Q_s [K_t; K_s]^T / sqrt(d_h)) [V_t; V_s]
        return self._out(jax.nn.dot_product_attention(self._query(search), k, v))

    def __call__(self, template, search):
        template_out, (k_t, v_t) = self.encode_template(template)
        return template_out, self.search_with_cache(search, k_t, v_t)
