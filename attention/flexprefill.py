"""FlexPrefill: context-aware sparse attention for prefilling (Lai et al., "FlexPrefill: A
Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference", ICLR 2025).

Paper references used in comments (sections / algorithms of the ICLR 2025 paper, Sec. 3):
[PD] "Query-Aware Sparse Pattern Determination" (the sqrt-JSD head-type test),
[CA] "Cumulative-Attention Based Index Selection" (smallest index set reaching gamma),
[VS] its vertical-slash index search, [QA] its query-aware index search.

Training-free: the layer has exactly SoftmaxAttention's parameters (a trained softmax LM's
checkpoint loads unchanged) and only changes how a prompt attends to itself at prefill. Per
(sequence, head), from the last query block q̂ (the last `block` queries):

    Â = softmax(q̂ K^T / sqrt d)  (causal)                    [n, T]    [PD]
    a_v = mean_rows Â (vertical: one value per key column),
    a_s = mean_rows sum along each diagonal of Â (slash: one value per distance q - k);
    â = softmax_blocks(mean(q̂) pool(K)^T / sqrt d)            the block-averaged estimate
    D = sqrt(JSD(â || pool_sum(a_v)))                           [PD]

  D < tau  -> query-aware head [QA]: estimated block map
              A_e = softmax_row(pool(Q) pool(K)^T / sqrt d) (causal over blocks), flattened and
              normalised (/NQ); keep the fewest (query block, key block) pairs, largest first,
              whose mass reaches gamma (one cover over the whole map, as in the paper and the
              reference, not one per query block).
  else     -> vertical-slash head [VS]: keep the fewest columns (largest a_v first) and the
              fewest diagonals (largest a_s first) whose mass reaches gamma each, expanded
              exactly into the blocks they touch (column c -> key block c // block in every
              query block; distance d -> block offsets d // block and, when d % block != 0, the
              next one).

Then, for every head: the first key block and the diagonal block are always kept, and every
query block keeps at least ceil(min_budget / block) key blocks (capped by causality), topped up by
the head's own block scores (query-aware: A_e; vertical-slash: pool(a_v)[j] + pool(a_s)[i - j]).
The mask [B, H, NQ, NK] runs through `block_sparse_attention(..., causal=True)`.

Everything is static-shaped (sorts and cumulative sums, both head types computed for all heads
and selected with jnp.where), so it jits; the mask is built on stop_gradient'ed q, k.

Deviations from bytedance/FlexPrefill (flex_prefill_attention.py), all deliberate:
- the reference converts the token count covering gamma into a count of top *pooled* blocks
  (and hard-codes a 128 divisor); here the selected columns / diagonals are expanded exactly
  into the blocks they touch (the paper's [VS] search is token level);
- the reference applies min_budget as a number of vertical and of slash blocks for every head;
  here it is a per-query-block floor (see above), as PAPERS.md specifies the minimum budget;
- any batch size (the reference asserts batch 1); the mask may differ per sequence.
Config (`config.model`, see CONFIG_DEFAULTS): flex_block, flex_gamma, flex_tau, flex_min_budget,
flex_in_train (also sparsify mode="train"; default off: the method is for prefill), sparse_impl.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention.ops.block_sparse import (BlockMask, SparseImplOption, block_sparse_attention,
                                        causal_blocks)
from attention.registry import register, set_options
from attention.softmax import SoftmaxAttention

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- pieces
def sqrt_jsd(p, q, axis: int = -1):
    """sqrt of the Jensen-Shannon divergence (natural log) of distributions p, q along `axis`:
    symmetric, 0 iff p == q, at most sqrt(ln 2) (disjoint supports). [PD]"""
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    m = 0.5 * (p + q)
    # xlogy(x, x / m) is 0 where x == 0 (and m > 0 wherever x > 0)
    kl_pm = jnp.sum(jax.scipy.special.xlogy(p, p) - jax.scipy.special.xlogy(p, m), axis=axis)
    kl_qm = jnp.sum(jax.scipy.special.xlogy(q, q) - jax.scipy.special.xlogy(q, m), axis=axis)
    jsd = 0.5 * kl_pm + 0.5 * kl_qm
    return jnp.sqrt(jnp.clip(jsd, 0.0, _LN2))


def cover(scores, gamma: float):
    """bool, same shape: the fewest entries along the last axis, largest first, whose sum
    reaches gamma * (sum of all): entry kept iff the mass sorted before it is < gamma * total
    ([CA]: min{k : sum of the top k >= gamma}). gamma >= 1 keeps every entry."""
    if gamma >= 1.0:
        return jnp.ones(scores.shape, jnp.bool_)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    s = jnp.take_along_axis(scores, order, axis=-1)
    before = jnp.cumsum(s, axis=-1) - s
    total = jnp.sum(scores, axis=-1, keepdims=True)
    keep_sorted = before < gamma * total
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def _pad_blocks(x, axis: int, block: int):
    """Pads `axis` to a multiple of block and splits it into [nb, block]."""
    n = x.shape[axis]
    nb = -(-n // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, nb * block - n)
    x = jnp.pad(x, pad)
    axis = axis % x.ndim
    return x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1:])


def _block_mean(x, block: int):
    """[B, T, H, d] -> [B, H, nb, d]: mean over each block's real (unpadded) tokens."""
    T = x.shape[1]
    xb = _pad_blocks(x, 1, block)                                   # [B, nb, block, H, d]
    nb = xb.shape[1]
    count = jnp.minimum(block, T - jnp.arange(nb) * block).astype(jnp.float32)
    return (jnp.sum(xb, axis=2) / count[None, :, None, None]).transpose(0, 2, 1, 3)


def flexprefill_mask(q, k, *, block: int = 128, gamma: float = 0.9, tau: float = 0.1,
                     min_budget: int = 512):
    """The FlexPrefill block mask of causal self-attention.

    q [B, T, H, d], k [B, T, H_kv, d] (RoPE applied; H a multiple of H_kv, query head h uses
    key head h // (H / H_kv)). Returns (mask bool [B, H, NB, NB] with NB = ceil(T / block),
    info) where info holds per head "jsd" [B, H] (D), "query_aware" [B, H] (D < tau),
    "estimate" [B, H, NB, NB] (A_e, rows sum to 1 over causal blocks) and "vertical" [B, H, NB]
    (pooled a_v, sums to 1)."""
    B, T, H, d = q.shape
    f32 = jnp.float32
    q = jax.lax.stop_gradient(q).astype(f32)
    k = jax.lax.stop_gradient(k).astype(f32)
    rep = H // k.shape[2]
    if rep > 1:
        k = jnp.repeat(k, rep, axis=2)
    scale = d ** -0.5
    nb = -(-T // block)
    n = min(block, T)
    causal = causal_blocks(nb, nb, block, block)                     # [NB, NB] lower triangle
    i_blk = jnp.arange(nb)[:, None]
    j_blk = jnp.arange(nb)[None, :]
    offset = jnp.clip(i_blk - j_blk, 0, nb - 1)                      # block diagonal offset

    # last query block: Â = softmax(q̂ K^T / sqrt d), causal [PD]
    q_last = q[:, T - n:]                                            # [B, n, H, d]
    q_pos = T - n + jnp.arange(n)
    s = jnp.einsum("bihd,bjhd->bhij", q_last, k) * scale             # [B, H, n, T]
    s = jnp.where(jnp.arange(T)[None, :] <= q_pos[:, None], s, -jnp.inf)
    a_hat = jax.nn.softmax(s, axis=-1)
    # vertical a_v[c] and slash a_s[dist] (dist = query pos - key pos), both sum to 1 [VS]
    a_v = jnp.mean(a_hat, axis=-2)                                   # [B, H, T]
    key_of = q_pos[:, None] - jnp.arange(T)[None, :]                 # [n, T]: key on diagonal dist
    on_diag = jnp.take_along_axis(a_hat, jnp.broadcast_to(jnp.maximum(key_of, 0),
                                                          a_hat.shape), axis=-1)
    a_s = jnp.sum(jnp.where(key_of >= 0, on_diag, 0.0), axis=-2) / n  # [B, H, T] by distance
    v_blk = jnp.sum(_pad_blocks(a_v, -1, block), -1)                 # [B, H, NB] per key block
    s_blk = jnp.sum(_pad_blocks(a_s, -1, block), -1)                 # [B, H, NB] per offset

    # block-averaged estimate of the last block's vertical profile, and D = sqrt(JSD) [PD]
    k_bar = _block_mean(k, block)                                    # [B, H, NB, d]
    est_last = jax.nn.softmax(
        jnp.einsum("bhd,bhjd->bhj", jnp.mean(q_last, axis=1), k_bar) * scale,
        axis=-1)
    D = sqrt_jsd(est_last, v_blk)                                    # [B, H]
    query_aware = D < tau

    # query-aware: estimated block map, flattened and normalised, covered to gamma [QA]
    q_bar = _block_mean(q, block)                                    # [B, H, NB, d]
    est = jnp.einsum("bhid,bhjd->bhij", q_bar, k_bar) * scale
    est = jax.nn.softmax(jnp.where(causal, est, -jnp.inf), axis=-1)  # [B, H, NB, NB]
    qa_sel = cover((est / nb).reshape(B, H, nb * nb), gamma).reshape(B, H, nb, nb) & causal

    # vertical-slash: top columns and diagonals covering gamma, expanded into blocks [VS]
    v_tok = cover(a_v, gamma)                                        # [B, H, T] columns
    s_tok = cover(a_s, gamma)                                        # [B, H, T] distances
    v_any = jnp.any(_pad_blocks(v_tok, -1, block), -1)               # key blocks with a column
    s_any = jnp.any(_pad_blocks(s_tok, -1, block), -1)               # offsets d // block
    spill = s_tok & (jnp.arange(T) % block != 0)                     # d also touches offset + 1
    s_next = jnp.any(_pad_blocks(spill, -1, block), -1)
    s_off = s_any | jnp.pad(s_next, [(0, 0), (0, 0), (1, 0)])[..., :nb]
    vs_sel = (v_any[:, :, None, :] | jnp.take(s_off, offset, axis=-1)) & causal

    sel = jnp.where(query_aware[:, :, None, None], qa_sel, vs_sel)
    # first key block and diagonal block always kept (the reference forces vertical block 0 and
    # slash offset 0 for every head)
    sel = sel | (causal & ((j_blk == 0) | (j_blk == i_blk)))
    # minimum budget: each query block keeps >= ceil(min_budget / block) causal key blocks, the
    # extra ones chosen by the head's own block scores
    budget = -(-int(min_budget) // block)
    if budget > 0:
        vs_score = v_blk[:, :, None, :] + jnp.take(s_blk, offset, axis=-1)   # in [0, 2]
        fill = jnp.where(query_aware[:, :, None, None], est, vs_score)
        key = jnp.where(causal, jnp.where(sel, 4.0, 0.0) + fill, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-key, axis=-1, stable=True), axis=-1)
        need = jnp.maximum(jnp.sum(sel, axis=-1), budget)
        sel = causal & (rank < need[..., None])
    info = {"jsd": D, "query_aware": query_aware, "estimate": est, "vertical": v_blk}
    return sel, info


def flexprefill_block_mask(q, k, *, block: int = 128, gamma: float = 0.9, tau: float = 0.1,
                           min_budget: int = 512):
    """The FlexPrefill BlockMask of q [B, T, H, d], k [B, T, H_kv, d], or None when every causal
    block would be kept anyway (at most 2 blocks: first + diagonal; or the minimum budget covers
    the sequence), where dense causal attention is the same and cheaper, as in the reference."""
    T = q.shape[1]
    nb = -(-T // block)
    if nb <= max(2, -(-int(min_budget) // block)):
        return None
    mask, _ = flexprefill_mask(q, k, block=block, gamma=gamma, tau=tau, min_budget=min_budget)
    return BlockMask.from_dense(mask, block, block, q_len=T, k_len=T, max_blocks=nb)


def flexprefill_attention(q, k, v, *, block: int = 128, gamma: float = 0.9, tau: float = 0.1,
                          min_budget: int = 512, impl: str = "auto"):
    """Causal self-attention of q [B, T, H, d] over k, v [B, T, H_kv, d] restricted to the
    FlexPrefill block mask -> [B, T, H, d] (dense causal where the mask would keep everything)."""
    bm = flexprefill_block_mask(q, k, block=block, gamma=gamma, tau=tau, min_budget=min_budget)
    if bm is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return block_sparse_attention(q, k, v, bm, causal=True, impl=impl, caller="FlexPrefill")


# ----------------------------------------------------------------------------- the layer
@register("flexprefill")
class FlexPrefillAttention(SparseImplOption, SoftmaxAttention):
    """SoftmaxAttention (same parameters) whose prompt self-attention at prefill is FlexPrefill;
    decoding over the cache stays dense, and so does training unless flex_in_train."""

    OPTION_PREFIX = "flex"
    CONFIG_DEFAULTS = {
        "flex_block": 128,        # block size (query and key), tokens
        "flex_gamma": 0.9,        # attention mass to cover
        "flex_tau": 0.1,          # sqrt-JSD threshold: D < tau -> query-aware head
        "flex_min_budget": 512,   # minimum key tokens per query block
        "flex_in_train": False,   # also sparsify mode="train"
    }

    OPTION_RULES = {"flex_block": ">= 1", "flex_gamma": "(0, 1]", "flex_tau": ">= 0",
                    "flex_min_budget": ">= 0"}

    def __init__(self, cfg, *, dtype=jnp.float32, rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.impl = set_options(self, cfg, "flex")["sparse_impl"]  # self.block = flex_block, ...

    def block_mask(self, q, k):
        """The bool [B, H, NB, NB] mask (and info) this layer would use for q, k (see
        flexprefill_mask)."""
        return flexprefill_mask(q, k, block=self.block, gamma=self.gamma, tau=self.tau,
                                min_budget=self.min_budget)

    def explain_extras(self, x, *, positions, q, k, mode: str) -> dict:
        """attention.explain's extras: the block mask bool [B, H, NB, NB] and which heads are
        query-aware (bool [B, H]; the others vertical-slash), where this mode applies them."""
        if not (mode == "prefill" or (mode == "train" and self.in_train)):
            return {}
        mask, info = self.block_mask(q, k)
        return {"block_mask": mask, "query_aware": info["query_aware"]}

    def attend(self, q, k, v, *, mode: str):
        if mode == "prefill" or (mode == "train" and self.in_train):
            bm = flexprefill_block_mask(q, k, block=self.block, gamma=self.gamma, tau=self.tau,
                                        min_budget=self.min_budget)
            T, H = q.shape[1], q.shape[2]
            if bm is None:
                self.report_cost(H * T * (T + 1) / 2)
                return jax.nn.dot_product_attention(q, k, v, is_causal=True)
            self.report_cost(bm.sequence_pairs(H, causal=True))
            return block_sparse_attention(q, k, v, bm, causal=True, impl=self.impl,
                                          caller="FlexPrefill")
        return super().attend(q, k, v, mode=mode)
