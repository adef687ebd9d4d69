"""HiP — Hierarchically Pruned attention (Lee et al., "A Training-free Sub-quadratic Cost
Transformer Model Serving Framework with Hierarchically Pruned Attention", ICLR 2025;
DeepAuto-AI/hip-attention), as a training-free prefill mechanism over the block-sparse op.

Mask estimation (the paper's Sec. 3, "mask estimation": a hierarchical top-k tree search), per
query head and query block of `block_q` queries:
  1. the candidate key range (the causal past, minus the sink blocks and the local window, which
     are always attended) is split into G = mask_k / block_k equal groups (the tree's nodes);
  2. every iteration splits each group into two halves and scores each half by its
     *representative*: the `rep_tokens` keys at the half's centre, score = max over the query
     block's queries and those keys of q . k;  the top-G halves survive (the rest are pruned);
  3. after ceil(log2(range / G)) iterations every group is a single key block: those G blocks
     (or fewer, when the range is shorter) are the query block's selection.
Attention is then `block_sparse_attention` over the selected blocks plus the sink blocks (the
first `sink` tokens), the local window (the last `window` tokens before each query) and the
diagonal block, causal within them. O(T log T) mask estimation, O(T) memory.

Mapping to the paper's hyper-parameters (defaults in CONFIG_DEFAULTS, from PAPERS.md):
  paper mask_k (512)        -> hip_mask_k: tokens selected per query block = G * block_k;
  paper block_size_q (64)   -> hip_block_q: the op's query block;
  paper block_size_k (2)    -> hip_rep_tokens: in the paper a leaf (and a node's representative)
                               is a block of 2 keys; the block-sparse op works on key blocks of
                               `hip_block_k` (64) tokens, so here a *leaf* is one op key block
                               and block_size_k keeps its role of the number of keys (at a node's
                               centre) that score the node;
  sliding window (256), sinks (16) -> hip_window, hip_sink (tokens).

The layer: SoftmaxAttention's parameters and call shape (a softmax LM checkpoint loads unchanged);
`attend` is sparse in mode "prefill" (and "train" when `hip_in_train`), dense causal otherwise;
decoding over the KV cache stays dense.

Shared with the other top-k block selectors (DHSA): `selection_block_mask` (a chosen-block set
-> BlockMask with the diagonal, sinks and local window always kept, static max_blocks) and
`topk_block_mask` (block scores -> top-k per query block -> the same).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attention.ops.block_sparse import (BlockMask, SparseImplOption, block_sparse_attention,
                                        causal_blocks, local_blocks, sink_blocks)
from attention.registry import read_options, register
from attention.softmax import SoftmaxAttention


# ------------------------------------------------------------------ shared block-mask helpers
def fixed_blocks(num_q_blocks: int, num_k_blocks: int, block_q: int, block_k: int, *,
                 sink_tokens: int = 0, window: int = 0):
    """Static numpy patterns (causal, fixed), both bool [NQ, NK]: `causal` = key blocks with a
    position <= some query of the block; `fixed` = the blocks always attended: the diagonal (the
    key blocks overlapping the query block), the sink blocks (first `sink_tokens` positions) and
    the causal window of `window` tokens before each query block, restricted to `causal`."""
    with jax.ensure_compile_time_eval():
        causal = np.asarray(causal_blocks(num_q_blocks, num_k_blocks, block_q, block_k))
        # window >= 1 always covers the key blocks overlapping the query block (the diagonal)
        local = np.asarray(local_blocks(num_q_blocks, num_k_blocks, block_q, block_k,
                                        max(int(window), 1)))
        sink = np.asarray(sink_blocks(num_q_blocks, num_k_blocks, block_k, int(sink_tokens)))
    return causal, causal & (local | sink)


def selection_block_mask(selected, max_selected: int, *, block_q: int, block_k: int,
                         q_len: int, k_len: int, sink_tokens: int = 0,
                         window: int = 0) -> BlockMask:
    """selected: bool [Bm, Hm, NQ, NK], at most `max_selected` True per row (static) -> the
    BlockMask of selected | fixed blocks (diagonal, sinks, local window), all causal. max_blocks
    is static (max fixed per row + max_selected, capped by the causal row length), so this works
    under jit with no data-dependent shapes."""
    nq, nk = selected.shape[-2:]
    causal, fixed = fixed_blocks(nq, nk, block_q, block_k, sink_tokens=sink_tokens, window=window)
    dense = (selected & causal) | fixed
    max_blocks = int(min(fixed.sum(-1).max() + max_selected, causal.sum(-1).max()))
    return BlockMask.from_dense(dense, block_q, block_k, q_len=q_len, k_len=k_len,
                                max_blocks=max(max_blocks, 1))


def topk_block_mask(scores, top_k: int, *, block_q: int, block_k: int, q_len: int, k_len: int,
                    sink_tokens: int = 0, window: int = 0) -> BlockMask:
    """scores: f32 [Bm, Hm, NQ, NK] block relevance -> BlockMask keeping, per query block, the
    `top_k` best causal key blocks *outside* the always-kept ones (diagonal, sinks, local window;
    so the budget goes to distant blocks) plus those always-kept blocks. top_k is static."""
    nq, nk = scores.shape[-2:]
    causal, fixed = fixed_blocks(nq, nk, block_q, block_k, sink_tokens=sink_tokens, window=window)
    candidate = jnp.asarray(causal & ~fixed)
    k = int(min(max(top_k, 0), nk))
    if k == 0:
        selected = jnp.zeros(scores.shape, bool)
    else:
        s = jnp.where(candidate, scores.astype(jnp.float32), -jnp.inf)
        top, idx = jax.lax.top_k(s, k)                                    # [Bm, Hm, NQ, k]
        hit = (idx[..., None] == jnp.arange(nk)) & (top > -jnp.inf)[..., None]
        selected = jnp.any(hit, axis=-2) & candidate
    return selection_block_mask(selected, k, block_q=block_q, block_k=block_k, q_len=q_len,
                                k_len=k_len, sink_tokens=sink_tokens, window=window)


def query_blocks(q, block_q: int):
    """q [B, T, H, D] -> (f32 [B, H, NQ, block_q, D] zero-padded, bool [NQ, block_q] valid)."""
    B, T, H, D = q.shape
    nq = -(-T // block_q)
    qp = jnp.pad(q.astype(jnp.float32), [(0, 0), (0, nq * block_q - T), (0, 0), (0, 0)])
    qb = qp.reshape(B, nq, block_q, H, D).transpose(0, 3, 1, 2, 4)
    valid = (jnp.arange(nq)[:, None] * block_q + jnp.arange(block_q)) < T
    return qb, valid


# ------------------------------------------------------------------ HiP mask estimation
def hip_search_range(T: int, block_q: int, block_k: int, sink_tokens: int, window: int):
    """Static [NQ] int numpy arrays (lo, hi): query block i searches key blocks [lo, hi_i): after
    the sink blocks and before the first block of its local window (those are always kept)."""
    nq, nk = -(-T // block_q), -(-T // block_k)
    lo = -(-int(sink_tokens) // block_k) if sink_tokens > 0 else 0
    with jax.ensure_compile_time_eval():
        local = np.asarray(local_blocks(nq, nk, block_q, block_k, max(int(window), 1)))
    hi = np.argmax(local, axis=-1)                   # first window block (every row has one)
    return np.full(nq, lo), np.maximum(hi, lo)


def hip_select(q, k, *, mask_k: int, block_q: int, block_k: int, rep_tokens: int = 2,
               sink_tokens: int = 0, window: int = 0):
    """HiP's hierarchical top-k key-block selection (Lee et al. 2025, Sec. 3, mask estimation).

    q [B, T, H, D], k [B, T, H_kv, D] -> int32 [B, H, NQ, G] selected key-block indices per
    query head and query block (G = ceil(mask_k / block_k)); -1 marks an unused slot (the range
    has fewer than G blocks). Valid entries are distinct and lie in the search range (strictly
    before the local window, after the sinks), hence causal."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = -(-int(mask_k) // block_k)
    r = max(int(rep_tokens), 1)
    lo, hi = hip_search_range(T, block_q, block_k, sink_tokens, window)
    nq = -(-T // block_q)
    if G == 0:  # no budget: only the sinks, the window and the diagonal
        return jnp.full((B, H, nq, 0), -1, jnp.int32)
    max_range = int((hi - lo).max(initial=0))
    iters = math.ceil(math.log2(max_range / G)) if max_range > G else 0
    qb, q_valid = query_blocks(jax.lax.stop_gradient(q), block_q)      # [B, H, NQ, bq, D]
    kh = jnp.repeat(jax.lax.stop_gradient(k).astype(jnp.float32), H // Hk, axis=2)
    kh = kh.transpose(0, 2, 1, 3)                                       # [B, H, T, D]

    # initial groups: [lo, hi_i) split into G near-equal node intervals (in key blocks)
    g = np.arange(G + 1)
    bounds = lo[:, None] + (g[None, :] * (hi - lo)[:, None]) // G       # [NQ, G + 1]
    s = jnp.broadcast_to(jnp.asarray(bounds[:, :-1], jnp.int32), (B, H, nq, G))
    e = jnp.broadcast_to(jnp.asarray(bounds[:, 1:], jnp.int32), (B, H, nq, G))

    for _ in range(iters):  # HiP Sec. 3: ~log2(range / G) iterations of split, score, top-G
        # split every node in two halves (a 1-block node: an empty half and itself)
        m = (s + e) // 2
        cs = jnp.concatenate([s, m], axis=-1)                           # [B, H, NQ, 2G]
        ce = jnp.concatenate([m, e], axis=-1)
        # representative: the rep_tokens keys at the half's centre (paper: block_size_k keys)
        centre = (cs + ce) * block_k // 2
        pos = centre[..., None] - r // 2 + jnp.arange(r)                # [B, H, NQ, 2G, r]
        pos = jnp.clip(pos, cs[..., None] * block_k,
                       jnp.maximum(ce[..., None] * block_k - 1, 0))
        pos = jnp.clip(pos, 0, T - 1)
        kr = jnp.take_along_axis(kh, pos.reshape(B, H, -1)[..., None], axis=2)
        kr = kr.reshape(B, H, nq, 2 * G, r, D)
        # HiP Sec. 3: node score = max over the query block and its representative keys of q . k
        sc = jnp.einsum("bhiqd,bhicrd->bhiqcr", qb, kr)
        sc = jnp.where(q_valid[None, None, :, :, None, None], sc, -jnp.inf)
        sc = jnp.max(sc, axis=(3, 5))                                   # [B, H, NQ, 2G]
        sc = jnp.where(ce > cs, sc, -jnp.inf)                           # empty halves never win
        _, keep = jax.lax.top_k(sc, G)                                  # prune to the top G
        s = jnp.take_along_axis(cs, keep, axis=-1)
        e = jnp.take_along_axis(ce, keep, axis=-1)
    return jnp.where(e > s, s, -1).astype(jnp.int32)


def hip_block_mask(q, k, *, mask_k: int, block_q: int, block_k: int, rep_tokens: int = 2,
                   sink_tokens: int = 0, window: int = 0) -> BlockMask:
    """The HiP BlockMask [B, H, NQ, NK]: hip_select's blocks | diagonal | sinks | local window."""
    T = q.shape[1]
    nk = -(-T // block_k)
    idx = hip_select(q, k, mask_k=mask_k, block_q=block_q, block_k=block_k,
                     rep_tokens=rep_tokens, sink_tokens=sink_tokens, window=window)
    selected = jnp.any((idx[..., None] == jnp.arange(nk)) & (idx[..., None] >= 0), axis=-2)
    return selection_block_mask(selected, idx.shape[-1], block_q=block_q, block_k=block_k,
                                q_len=T, k_len=T, sink_tokens=sink_tokens, window=window)


# ------------------------------------------------------------------ the layer
class BlockSparsePrefillAttention(SparseImplOption, SoftmaxAttention):
    """SoftmaxAttention whose prefill (and, if `<prefix>_in_train`, training) attention is
    block-sparse over a mask built from q and k by `block_mask`; subclasses set OPTION_PREFIX
    and CONFIG_DEFAULTS (read into attributes of the same names) with their OPTION_RULES.
    On the sparse path it sows "attention_pairs" (SoftmaxAttention.report_cost): the (query,
    key) pairs per sequence."""

    def __init__(self, cfg, *, dtype=jnp.float32, rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        # options as plain (static, hashable) attributes named like their config fields
        for key, value in read_options(type(self), cfg).items():
            setattr(self, key, value)
        self.in_train = getattr(self, f"{self.OPTION_PREFIX}_in_train")

    def block_mask(self, q, k) -> BlockMask:
        """The prefill mask of q [B, T, H, d] and k [B, T, H_kv, d]: each mechanism's own."""
        raise NotImplementedError(f"{type(self).__name__} must define block_mask(q, k)")

    def explain_extras(self, x, *, positions, q, k, mode: str) -> dict:
        """attention.explain's extras: the block mask, bool [B|1, H|1, NQ, NK], where this mode
        applies it (prefill; training with *_in_train)."""
        if not (mode == "prefill" or (mode == "train" and self.in_train)):
            return {}
        return {"block_mask": self.block_mask(q, k).to_dense()}

    def attend(self, q, k, v, *, mode: str):
        if mode == "prefill" or (mode == "train" and self.in_train):
            mask = self.block_mask(q, k)
            self.report_cost(mask.sequence_pairs(q.shape[2], causal=True))
            return block_sparse_attention(q, k, v, mask, causal=True, impl=self.sparse_impl,
                                          caller=type(self).__name__)
        return super().attend(q, k, v, mode=mode)


@register("hip")
class HiPAttention(BlockSparsePrefillAttention):
    """Softmax attention whose prefill is HiP block-sparse attention (module docstring)."""

    OPTION_PREFIX = "hip"
    CONFIG_DEFAULTS = {
        "hip_mask_k": 512,        # tokens chosen per query block by the tree search (paper k)
        "hip_block_q": 64,        # paper block_size_q; the op's query block
        "hip_block_k": 64,        # the op's key block = the search's leaf (paper: 2 tokens)
        "hip_rep_tokens": 2,      # paper block_size_k: keys at a node's centre that score it
        "hip_window": 256,        # sliding window (tokens), always attended
        "hip_sink": 16,           # attention-sink tokens at the start, always attended
        "hip_in_train": False,    # sparse in mode="train" too (default: dense training)
    }
    # hip_mask_k = 0: no tree search, only the sinks, the window and the diagonal (a control)
    OPTION_RULES = {"hip_mask_k": ">= 0", "hip_block_q": ">= 1", "hip_block_k": ">= 1",
                    "hip_rep_tokens": ">= 1", "hip_window": ">= 0", "hip_sink": ">= 0"}

    def block_mask(self, q, k) -> BlockMask:
        return hip_block_mask(q, k, mask_k=self.hip_mask_k, block_q=self.hip_block_q,
                              block_k=self.hip_block_k, rep_tokens=self.hip_rep_tokens,
                              sink_tokens=self.hip_sink, window=self.hip_window)
