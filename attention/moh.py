"""MoH: Mixture-of-Head attention (Jin, Zhu, Yuan & Yan, "MoH: Multi-Head Attention as
Mixture-of-Head Attention", 2024; reference code: SkyworkAI/MoH, MoHAttention).

Multi-head attention written as a sum over heads, sum_h H^h W_O^h, becomes a per-token gated sum
sum_h g_h(x_t) H^h W_O^h (eq. 3): o_proj(concat_h g_h * head_h). Of the H query heads
  * the first h_s = `moh_shared_heads` are shared (always on), gated by softmax(W_s x) * h_s;
  * the other E = H - h_s are routed: router probabilities p = softmax(W_r x) over the E heads,
    keep the top k = `moh_top_k`, renormalise over the kept ones and multiply by k (so an even
    routing gives every kept head gate 1); unselected routed heads have gate exactly 0;
  * a 2-way softmax(W_h x) * 2 weighs the two groups: [alpha_1, alpha_2] (eq. 5).
  (The paper's eq. 4 writes the plain softmax gates; the scalings * h_s, renormalise * k and * 2
  follow the official code, as PAPERS.md says: with zero routers and k = E every gate is 1 and
  the layer is exactly the underlying multi-head attention.) With h_s = 0 there is no shared
  group and no 2-way softmax: the gates are the routed ones.
Load balance (eq. 6, with PAPERS.md's E factor): l_aux = E * sum_i f_i P_i over the routed heads,
f_i the fraction of tokens (batch and sequence) that select head i, P_i the mean router
probability of head i; a perfectly balanced top-k routing gives f_i = k / E, P_i = 1 / E, so
l_aux = k. `moh_aux_weight` * l_aux (the paper's beta = 0.01) is sown as nnx.Intermediate
"aux_loss" in mode="train" (the Task adds it to the loss).

Config (config.model, attention.registry.read_options): moh_shared_heads (int, 0 <= h_s < H),
moh_top_k (an int head count, 1 <= k <= E, rather than a fraction: exact, as the official code's
number of activated heads), moh_aux_weight (float).

Head skipping: every head is computed densely and the unselected routed heads are then masked
(multiplied by their gate 0) before o_proj. The selection varies per token, so skipping a head
for some tokens only would be a gather of each token's k query heads ([B, T, k, hd]) followed by
per-token attention against the full key/value heads: with static shapes under XLA that gather
(and its scatter in the backward) plus the loss of the batched [T, T] matmul per head cost more
than the (H - k) / H of the attention they save at these sizes (k close to E, small heads, CPU).
The keys and values are needed for every head anyway (any later token may select the head).
So the output is exactly that of skipping (an unselected head contributes 0, its gradient too),
not its FLOP saving.

Same q/k/v/o projections (names, shapes, logical axes) as SoftmaxAttention, so a trained softmax
checkpoint loads; the routers are new parameters: router W_r [D, E], group_router W_h [D, 2]
(h_s > 0) and shared_router W_s [D, h_s] (h_s > 1: one shared head's softmax gate is 1).
The gates depend only on the current token, so the KV cache (prefill / decode) is the softmax one.
BIDIRECTIONAL: honours model.causal=False (ViT).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.layers import dense
from attention.registry import read_options, register
from attention.softmax import SoftmaxAttention, check_mode


def load_balance_loss(probs, selected):
    """probs [..., E] router probabilities, selected [..., E] 0/1 (the top-k) -> scalar
    E * sum_i f_i P_i over all leading (token) positions."""
    E = probs.shape[-1]
    f = jnp.mean(selected.reshape(-1, E).astype(jnp.float32), axis=0)   # fraction selecting i
    P = jnp.mean(probs.reshape(-1, E).astype(jnp.float32), axis=0)      # mean router probability
    return E * jnp.sum(f * P)  # Jin et al. 2024, eq. 6 (times E: = k when balanced)


def moh_gates(x, router, shared_router, group_router, *, shared_heads: int, top_k: int):
    """x [..., D] -> (gates [..., H] f32, routed probs [..., E], selected [..., E]).

    Shared heads first, then routed heads (the query-head order of q_proj)."""
    logits = router(x).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)                               # softmax(W_r x)
    E = probs.shape[-1]
    _, idx = jax.lax.top_k(probs, top_k)
    selected = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=-2)  # Top-K mask
    kept = probs * selected
    # eq. 4 (routed part), renormalised over the top-k and times k (official code)
    routed = kept / jnp.sum(kept, axis=-1, keepdims=True) * top_k
    if not shared_heads:
        return routed, probs, selected
    if shared_router is None:  # h_s = 1: softmax over one head
        shared = jnp.ones(routed.shape[:-1] + (1,), jnp.float32)
    else:
        # eq. 4 (shared part), times h_s (official code)
        shared = jax.nn.softmax(shared_router(x).astype(jnp.float32), axis=-1) * shared_heads
    alpha = jax.nn.softmax(group_router(x).astype(jnp.float32), axis=-1) * 2.0  # eq. 5, times 2
    gates = jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], axis=-1)
    return gates, probs, selected


@register("moh")
class MoHAttention(SoftmaxAttention):
    """x [B, T, D] -> [B, T, D]: softmax attention whose heads are gated per token (module
    docstring). Parameters: SoftmaxAttention's + router [D, E], shared_router [D, h_s] (when
    h_s > 1), group_router [D, 2] (when h_s > 0)."""

    OPTION_PREFIX = "moh"
    CONFIG_DEFAULTS = dict(moh_shared_heads=1, moh_top_k=2, moh_aux_weight=0.01)
    OPTION_RULES = dict(moh_shared_heads=">= 0", moh_top_k=">= 1", moh_aux_weight=">= 0")
    BIDIRECTIONAL = True

    @staticmethod
    def validate_options(opt, cfg):
        if not 0 <= opt["moh_shared_heads"] < cfg.num_heads:
            raise ValueError(f"config.model.moh_shared_heads={opt['moh_shared_heads']} must be in "
                             f"[0, model.num_heads={cfg.num_heads}) (at least one routed head)")
        routed = cfg.num_heads - opt["moh_shared_heads"]
        if opt["moh_top_k"] > routed:
            raise ValueError(f"config.model.moh_top_k={opt['moh_top_k']} must be <= the routed "
                             f"heads model.num_heads - moh_shared_heads = {routed}")

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        opt = read_options(type(self), cfg)
        H = self.num_heads
        self.shared_heads = opt["moh_shared_heads"]
        self.top_k = opt["moh_top_k"]
        self.aux_weight = opt["moh_aux_weight"]
        E = H - self.shared_heads
        self.routed_heads = E
        if not 1 <= self.top_k <= E:
            raise ValueError(f"model.moh_top_k={self.top_k} must be in [1, {E}] (the routed "
                             f"heads: num_heads={H} - moh_shared_heads={self.shared_heads})")
        d = cfg.d_model
        self.router = dense(d, E, ("embed", None), dtype=dtype, rngs=rngs)
        # a single shared head's softmax gate is the constant 1 * h_s: no W_s then
        self.shared_router = dense(d, self.shared_heads, ("embed", None), dtype=dtype,
                                   rngs=rngs) if self.shared_heads > 1 else None
        self.group_router = dense(d, 2, ("embed", None), dtype=dtype,
                                  rngs=rngs) if self.shared_heads else None

    def gates(self, x):
        """x [B, T, D] -> (gates [B, T, H], router probs [B, T, E], selected [B, T, E])."""
        return moh_gates(x, self.router, self.shared_router, self.group_router,
                         shared_heads=self.shared_heads, top_k=self.top_k)

    def __call__(self, x, *, positions, cache=None, mode: str = "train"):
        check_mode(mode, cache)
        B, T, _ = x.shape
        # the gates only depend on the current token: the softmax heads and KV cache as they are
        y, cache = self.head_outputs(x, positions=positions, cache=cache, mode=mode)
        gates, probs, selected = self.gates(x)
        if mode == "train":
            self.sow(nnx.Intermediate, "aux_loss",  # eq. 7: beta L_b (outside nnx.capture: no-op)
                     self.aux_weight * load_balance_loss(probs, selected), capture_noop=True)
        # eq. 3: sum_h g_h H^h W_O^h = o_proj(concat_h g_h * head_h); unselected heads: g_h = 0
        y = y * gates.astype(y.dtype)[..., None]
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim)), cache
