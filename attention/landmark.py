"""Landmark attention (Mohtashami & Jaggi, "Random-Access Infinite Context Length for
Transformers", NeurIPS 2023; reference code epfml/landmark-attention, llama/llama_mem.py).

The sequence is split into blocks of l = `landmark_every` tokens (block of position p: p // l,
counted from the start of the segment, i.e. from position 0 in LM training and generation). Every
block b has a landmark key k_L(b); a query reaches the tokens of an earlier block only through the
block's landmark (a gate), which is what makes top-k block retrieval at inference possible.

Pinned in-layer variant (families have no mechanism-specific branches, so no landmark *tokens*
are inserted into the input; everything happens inside this layer):

    k_L(b) = sum_{j in b} alpha_j k~_j + e_g,   alpha = softmax_{j in b}(k~_j . w_g / sqrt(d))

  k~_j: the block's keys *before* RoPE (kv head g), w_g (`landmark_pool`) a learned pooling query
  and e_g (`landmark_embed`) a learned landmark vector, both [num_kv_heads, head_dim] and
  initialised to 0 (so k_L starts as the mean key of the block). The landmark score of query i is
  content-based and position-free: s_L(i, b) = q~_i . k_L(b) / sqrt(d), with q~_i the query
  before RoPE (query head h reads kv head h // (H / H_kv), as for GQA). Token scores keep RoPE:
  s(i, j) = q_i . k_j / sqrt(d).

  Difference from the paper: there the landmark is an extra input token (own embedding) inserted
  after every l tokens; it goes through every layer, has a position (RoPE) and its key is produced
  by the whole network. Here the landmark key is a learned attention-pooling summary of the block's
  own keys in this layer plus a learned offset, no token is added to the sequence (T and the
  positions are unchanged, so the family and the data pipeline need no change), and the landmark
  score carries no position, which makes retrieval at any distance position-independent (the
  paper needs its "stingy" position mapping at long contexts for this).

Training (mode "train"), the paper's grouped softmax (Sec. 3.1, eqs. 1-4: GroupedSoftmax with the
grouping G_ij, then AttWeight): for query i in block c = c(i),
    outer group:  {L_b : b < c}  and  {j : c(j) = c, j <= i}       (one softmax, p_out)
    inner groups: {j : c(j) = b} for every b < c                    (one softmax each, p_in)
    w(i, j) = p_out(j)                 if c(j) = c, j <= i
            = p_in(j) * p_out(L_b)     if c(j) = b < c
            = 0                        otherwise;   landmarks carry no value, sum_j w(i, j) = 1.
  The current block's own landmark is not in the outer group (G_ij = -1 in the paper). Written in
  O(T^2) jnp (`grouped_softmax_attention`); with T <= l (no complete earlier block) it is causal
  softmax attention.

Inference (mode "prefill"): query blocks = key blocks = l tokens. For query block n, each earlier
block b < n is scored by the *max over the block's queries* of s_L(i, b) (the paper's "merge
scores across tokens by max"), per query head; the top k = `landmark_top_k` blocks are kept.
Query block n then attends to them plus the local window (its own block, causal), through
`block_sparse_attention` with `BlockMask.from_indices`. Two formulas (`landmark_inference`):
  "grouped" (default): the grouped softmax restricted to the retrieved blocks. The op is called
      once over k+1 "slots" stacked on the head axis (slot s of query head h attends to one key
      block: the s-th retrieved block, or the local block for the last slot) with return_lse;
      the slots' outputs o_s (each an inner softmax over one block) and the outer softmax over
      [s_L(i, b_s) for the retrieved blocks, lse_local(i)] are combined:
          y_i = sum_s softmax(z_i)_s o_s,  z_i = [s_L(i, b_1..b_k), lse_local(i)].
      With k >= the number of earlier blocks this is exactly the training-time output.
  "standard": a standard causal softmax over the tokens of the retrieved blocks plus the local
      block (one op call, k+1 key blocks per query block): retrieved tokens attended with a
      standard softmax, the paper's inference as PAPERS.md summarises it. With k >= the number of
      earlier blocks it equals dense causal softmax attention (SoftmaxAttention with the same
      parameters), not the grouped softmax, so it is not the training-time formula.
  Cost: "grouped" repeats q k+1 times on the head axis (one single-block slot each); both do
  O(T (k+1) l d) attention work plus O(T (T / l) d) landmark scores. Prefill must start at
  position 0 (as models.lm.generate does): blocks are counted from the segment start.

Decoding (mode "decode", one token at absolute position p, block c = p // l): the cache holds
the RoPE'd keys and values (as SoftmaxAttention) plus the landmark keys of all blocks
("kl": [B, ceil(max_len / l), H_kv, d]); at each step the landmark of block c is recomputed from
the cached keys of the block (un-rotated by RoPE at minus their positions) and written to "kl".
`landmark_decode`:
  "dense" (default): the grouped softmax over the whole cache (every complete earlier block, all
      of its tokens): the same formula as training, so generation equals a full train-mode
      recompute whenever the prefill also did (prompt within landmark_top_k + 1 blocks, grouped).
  "topk": keep only the top-k earlier blocks by s_L(p, b) (per query head, per token) and take
      the grouped softmax over those plus the current block (prefill's "grouped" formula for one
      query); only the k selected blocks are gathered from the cache
      (`retrieval_decode_attention`). With k >= the number of earlier blocks it equals "dense".

Config (`config.model`, CONFIG_DEFAULTS): landmark_every (l, 50 as in the paper's LM runs),
landmark_top_k (5, PAPERS.md), landmark_inference ("grouped" | "standard"),
landmark_decode ("dense" | "topk"), landmark_impl (block_sparse_attention impl, "auto").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention.inspect import effective_weights
from attention.ops.block_sparse import IMPLS, BlockMask, block_sparse_attention
from attention.ops.rope import apply_rope
from attention.registry import read_options, register
from attention.softmax import SoftmaxAttention, check_mode
from attention.sharding import constrain

_NEG = -jnp.inf


def _masked_softmax(x, mask, axis=-1):
    """softmax of x over `axis` restricted to mask; an all-masked row gives zeros (never NaN,
    and NaN-free gradients)."""
    m = jnp.max(jnp.where(mask, x, _NEG), axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, x, m) - m), 0.0)
    s = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(s > 0, s, 1.0)


def _expand(x, heads: int):
    """[B, S, H_kv, ...] -> [B, S, heads, ...]: GQA, query head h reads kv head h // rep."""
    rep = heads // x.shape[2]
    return x if rep == 1 else jnp.repeat(x, rep, axis=2)


def landmark_keys(k_raw, w, e, block: int, valid=None):
    """The landmark key of every block: attention pooling of the block's (pre-RoPE) keys plus a
    learned vector. k_raw [B, S, H_kv, d]; w, e [H_kv, d]; valid: bool [S] (None: all) ->
    [B, ceil(S / block), H_kv, d] f32. k_L(b) = sum_{j in b} softmax_j(k_j . w / sqrt d) k_j + e
    (valid keys only; a block without valid keys gets e)."""
    B, S, G, d = k_raw.shape
    nb = -(-S // block)
    pad = nb * block - S
    f32 = jnp.float32
    ok = jnp.ones((S,), bool) if valid is None else valid
    ok = jnp.pad(ok, (0, pad)).reshape(nb, block)
    kb = jnp.pad(k_raw.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(B, nb, block, G, d)
    logits = jnp.einsum("bnlgd,gd->bngl", kb, w.astype(f32)) * d ** -0.5
    alpha = _masked_softmax(logits, ok[None, :, None, :])                  # [B, nb, G, l]
    return jnp.einsum("bngl,bnlgd->bngd", alpha, kb) + e.astype(f32)


def landmark_scores(q_raw, kl):
    """s_L(i, b) = q~_i . k_L(b) / sqrt(d). q_raw [B, T, H, d] (pre-RoPE); kl [B, NB, H_kv, d]
    -> [B, H, T, NB] f32."""
    H, d = q_raw.shape[2], q_raw.shape[-1]
    return jnp.einsum("bthd,bnhd->bhtn", q_raw.astype(jnp.float32),
                      _expand(kl.astype(jnp.float32), H)) * d ** -0.5


def grouped_softmax_attention(q, k, v, s_land, *, block: int, q_pos=None,
                              return_weights: bool = False):
    """The grouped softmax of landmark attention (Mohtashami & Jaggi 2023, Sec. 3.1, eqs. 1-4),
    O(T x S) in f32.

    q [B, T, H, d] (RoPE applied), k, v [B, S, H_kv, d] at key positions 0..S-1; s_land
    [B, H, T, NB] the landmark logits s_L(i, b) (NB >= ceil(S / block); only b < c(i) are used);
    q_pos int [T] the queries' positions (default 0..T-1; key positions must cover them).
    Query i in block c = q_pos_i // block: outer softmax over {L_b : b < c} and
    {j : j // block = c, j <= q_pos_i}; inner softmax over each earlier block b < c;
    w(i, j) = p_out(j) in the current block, p_in(j) * p_out(L_b) in earlier block b.
    Returns y [B, T, H, d] f32 (and w [B, H, T, S], each row summing to 1, landmarks excluded).
    """
    f32 = jnp.float32
    B, T, H, d = q.shape
    S = k.shape[1]
    nb = -(-S // block)
    s_land = s_land[..., :nb].astype(f32)
    k, v = _expand(k, H).astype(f32), _expand(v, H).astype(f32)
    q_pos = jnp.arange(T) if q_pos is None else jnp.asarray(q_pos)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k) * d ** -0.5      # [B, H, T, S]
    k_pos = jnp.arange(nb * block)                                       # padded key positions
    qc, kc = q_pos // block, k_pos // block
    real = k_pos < S
    same = (kc[None, :] == qc[:, None]) & (k_pos[None, :] <= q_pos[:, None]) & real
    earlier = (kc[None, :] < qc[:, None]) & real                         # [T, nb * l]
    land_ok = jnp.arange(nb)[None, :] < qc[:, None]                      # [T, nb]
    s = jnp.pad(s, [(0, 0), (0, 0), (0, 0), (0, nb * block - S)])
    # outer group: earlier landmarks + current-block tokens (paper: G_ij = p_i)
    outer = _masked_softmax(jnp.concatenate([s_land, s], -1),
                            jnp.concatenate([land_ok, same], -1))
    p_land, p_tok = outer[..., :nb], outer[..., nb:]
    # inner groups: each earlier block on its own (paper: G_ij = p_j)
    p_in = _masked_softmax(s.reshape(B, H, T, nb, block),
                           earlier.reshape(T, nb, block)).reshape(B, H, T, nb * block)
    w = p_tok + p_in * jnp.repeat(p_land, block, axis=-1)                 # landmarks: no value
    w = w[..., :S]
    y = jnp.einsum("bhts,bshd->bthd", w, v)
    return (y, w) if return_weights else y


def select_blocks(s_land, block: int, q_len: int, top_k: int):
    """Top-k earlier blocks per query block (size `block`) by the max over the block's queries of
    the landmark scores. s_land [B, H, T, NB] -> (indices int32 [B, H, NQ, k], valid bool
    [B, H, NQ, k]) with k = min(top_k, NQ - 1); a slot is invalid where the query block has
    fewer than k earlier blocks (its index is then the query block itself)."""
    B, H, T, nb = s_land.shape
    nq = -(-q_len // block)
    k = min(int(top_k), nq - 1)
    pad = nq * block - T
    s = jnp.pad(s_land.astype(jnp.float32), [(0, 0), (0, 0), (0, pad), (0, 0)],
                constant_values=_NEG)
    score = jnp.max(s.reshape(B, H, nq, block, nb), axis=3)[..., :nq]     # [B, H, NQ, NQ]
    earlier = jnp.arange(nq)[None, :] < jnp.arange(nq)[:, None]
    score = jnp.where(earlier, score, _NEG)
    if k <= 0:
        z = jnp.zeros((B, H, nq, 0), jnp.int32)
        return z, z.astype(bool)
    _, idx = jax.lax.top_k(score, k)
    valid = jnp.arange(k) < jnp.arange(nq)[:, None]                      # n earlier blocks
    valid = jnp.broadcast_to(valid, idx.shape)
    own = jnp.broadcast_to(jnp.arange(nq)[:, None], idx.shape)
    return jnp.where(valid, idx, own).astype(jnp.int32), valid


def landmark_retrieval_attention(q, k, v, s_land, *, block: int, top_k: int,
                                 formula: str = "grouped", impl: str = "auto", report=None):
    """Prefill: top-k block retrieval plus the local block through block_sparse_attention.
    q [B, T, H, d] (RoPE), k, v [B, T, H_kv, d], s_land [B, H, T, NB] -> y [B, T, H, d] f32.
    formula "grouped": the grouped softmax restricted to the retrieved blocks (k+1 single-block
    slots stacked on the head axis, combined by their lse and the landmark logits);
    "standard": a standard causal softmax over the retrieved blocks' tokens and the local block.
    report: optional callable given the (query, key) pairs computed per sequence (all heads)."""
    B, T, H, d = q.shape
    nq = -(-T // block)
    idx, valid = select_blocks(s_land, block, T, top_k)                  # [B, H, NQ, k]
    kk = idx.shape[-1]
    own = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (B, H, nq, 1))
    if formula == "standard":
        ind = jnp.concatenate([jnp.where(valid, idx, -1), own], -1)
        mask = BlockMask.from_indices(ind, nq, block, block, q_len=T, k_len=T)
        if report is not None:
            report(mask.sequence_pairs(H, causal=True))
        return block_sparse_attention(q, k, v, mask, causal=True, impl=impl,
                                      caller="Landmark").astype(jnp.float32)
    if formula != "grouped":
        raise ValueError(f"landmark_inference must be 'grouped' or 'standard', got {formula!r}")
    n = kk + 1
    slots = jnp.concatenate([idx, own], -1)                              # [B, H, NQ, n]
    # slot s of query head h becomes head h * n + s; with kv head g = h // rep this keeps GQA:
    # (h * n + s) // (rep * n) = h // rep
    ind = slots.transpose(0, 1, 3, 2).reshape(B, H * n, nq, 1)
    mask = BlockMask.from_indices(ind, nq, block, block, q_len=T, k_len=T)
    if report is not None:
        report(mask.sequence_pairs(H * n, causal=True))
    q_rep = jnp.repeat(q, n, axis=2)                                     # [B, T, H * n, d]
    o, lse = block_sparse_attention(q_rep, k, v, mask, causal=True, impl=impl, return_lse=True,
                                    caller="Landmark")
    o = o.astype(jnp.float32).reshape(B, T, H, n, d)
    lse = lse.reshape(B, H, n, T)
    # outer logits: the retrieved blocks' landmark scores, then the local block's lse
    q_blk = jnp.minimum(jnp.arange(T) // block, nq - 1)
    tok_idx = idx[:, :, q_blk, :]                                         # [B, H, T, k]
    tok_valid = valid[:, :, q_blk, :]
    s_sel = jnp.take_along_axis(s_land.astype(jnp.float32), tok_idx, axis=-1)
    z = jnp.concatenate([s_sel, lse[:, :, -1, :, None]], -1)             # [B, H, T, n]
    ok = jnp.concatenate([tok_valid, jnp.ones((B, H, T, 1), bool)], -1)
    a = _masked_softmax(z, ok)
    return jnp.einsum("bhtn,btnhd->bthd", a, o.transpose(0, 1, 3, 2, 4))


def retrieval_decode_attention(q, kc, vc, s_land, pos, *, block: int, top_k: int):
    """One decoding step with top-k retrieval from the cache: the grouped softmax over the top-k
    earlier blocks (by s_L(p, b), per query head) and the current block's tokens <= pos, with
    only those k blocks gathered (O(NB d + (k + 1) l d) per head instead of O(S d)).
    q [B, 1, H, d] (RoPE); kc, vc [B, S, H_kv, d] with S a multiple of `block`; s_land
    [B, H, 1, S / block]; pos: int scalar, the query's position -> y [B, 1, H, d] f32."""
    f32 = jnp.float32
    B, _, H, d = q.shape
    S, G = kc.shape[1], kc.shape[2]
    rep, nb, l = H // G, S // block, block
    c = pos // l
    qh = q[:, 0].astype(f32)                                            # [B, H, d]
    # the current block (local window): tokens c*l .. pos
    cur_pos = c * l + jnp.arange(l)
    kcur = _expand(jax.lax.dynamic_slice_in_dim(kc, c * l, l, 1), H).astype(f32)
    vcur = _expand(jax.lax.dynamic_slice_in_dim(vc, c * l, l, 1), H).astype(f32)
    z = [jnp.einsum("bhd,blhd->bhl", qh, kcur) * d ** -0.5]
    ok = [jnp.broadcast_to(cur_pos <= pos, (B, H, l))]
    k_sel = min(int(top_k), nb)
    if k_sel > 0:
        earlier = jnp.arange(nb) < c
        val, idx = jax.lax.top_k(jnp.where(earlier, s_land[:, :, 0].astype(f32), _NEG), k_sel)
        valid = jnp.broadcast_to(jnp.arange(k_sel) < c, (B, H, k_sel))
        # gather the selected blocks per kv head: query heads g*rep..g*rep+rep-1 read kv head g
        idx_g = jnp.where(valid, idx, 0).reshape(B, G, rep * k_sel)
        bi, gi = jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None]
        kg, vg = (x.reshape(B, nb, l, G, d)[bi, idx_g, :, gi, :]         # [B, G, rep*k, l, d]
                  .reshape(B, H, k_sel, l, d).astype(f32) for x in (kc, vc))
        p_in = jax.nn.softmax(jnp.einsum("bhd,bhkld->bhkl", qh, kg) * d ** -0.5, axis=-1)
        o_blk = jnp.einsum("bhkl,bhkld->bhkd", p_in, vg)                 # inner softmax outputs
        z.insert(0, jnp.where(valid, val, 0.0))
        ok.insert(0, valid)
    a = _masked_softmax(jnp.concatenate(z, -1), jnp.concatenate(ok, -1))  # outer softmax
    y = jnp.einsum("bhl,blhd->bhd", a[..., -l:], vcur)
    if k_sel > 0:
        y = y + jnp.einsum("bhk,bhkd->bhd", a[..., :k_sel], o_blk)
    return y[:, None]


@register("landmark")
class LandmarkAttention(SoftmaxAttention):
    """x [B, T, D] -> [B, T, D]: SoftmaxAttention's projections (same names, shapes, logical axes:
    a softmax checkpoint's q/k/v/o load unchanged) with in-layer landmark attention (module
    docstring). Extra parameters: landmark_pool, landmark_embed [num_kv_heads, head_dim] (zeros).
    Cache: {"k", "v": [B, S, H_kv, d] (RoPE'd), "kl": [B, S / l, H_kv, d] f32}, S = max_len
    rounded up to a multiple of l."""

    OPTION_PREFIX = "landmark"
    CONFIG_DEFAULTS = {
        "landmark_every": 50,          # l, tokens per block (paper's LM experiments)
        "landmark_top_k": 5,           # blocks kept per query block (prefill) / token ("topk")
        "landmark_inference": "grouped",  # prefill formula: "grouped" | "standard"
        "landmark_decode": "dense",    # "dense" (== full recompute) | "topk"
        "landmark_impl": "auto",       # block_sparse_attention impl at prefill
    }
    OPTION_RULES = {"landmark_every": ">= 1", "landmark_top_k": ">= 0",
                    "landmark_inference": ("grouped", "standard"),
                    "landmark_decode": ("dense", "topk"), "landmark_impl": IMPLS}

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        opt = read_options(type(self), cfg)
        self.block, self.top_k, self.inference, self.decode, self.impl = (
            opt[f"landmark_{k}"] for k in ("every", "top_k", "inference", "decode", "impl"))
        shape = (self.num_kv_heads, self.head_dim)
        init = nnx.with_partitioning(nnx.initializers.zeros, ("kv_heads", None))
        self.landmark_pool = nnx.Param(init(None, shape, jnp.float32))
        self.landmark_embed = nnx.Param(init(None, shape, jnp.float32))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        nb = -(-max_len // self.block)
        cache = super().init_cache(batch, nb * self.block, dtype)
        cache["kl"] = jnp.zeros((batch, nb, self.num_kv_heads, self.head_dim), jnp.float32)
        return cache

    def _landmarks(self, k_raw, valid=None):
        return landmark_keys(k_raw, self.landmark_pool[...], self.landmark_embed[...],
                             self.block, valid)

    def explain_extras(self, x, *, positions, q, k, mode: str) -> dict:
        """attention.explain's extras: "retrieved" [B, H, NQ, NQ] (1: a block the query block
        retrieved at prefill, 0.5: its own) and the "weights" [B, H, T, T] this layer applies at
        `mode` (grouped softmax in training, retrieval at prefill)."""
        B, T, _ = x.shape
        q_raw = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k_raw = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        s_land = landmark_scores(q_raw, self._landmarks(k_raw))              # [B, H, T, NB]
        idx, valid = select_blocks(s_land, self.block, T, self.top_k)        # [B, H, NQ, k]
        nq = idx.shape[2]
        hit = jnp.any((idx[..., None] == jnp.arange(nq)) & valid[..., None], axis=3)
        retrieved = jnp.where(hit, 1.0, 0.5 * jnp.eye(nq))

        def attend(q, k, v):  # q, k, v stacked chunk-major on the batch axis (effective_weights)
            s = jnp.broadcast_to(s_land[None], (q.shape[0] // B, *s_land.shape))
            s = s.reshape(-1, *s_land.shape[1:])
            if mode == "train":
                return grouped_softmax_attention(q, k, v, s, block=self.block)
            return landmark_retrieval_attention(q, k, v, s, block=self.block, top_k=self.top_k,
                                                formula=self.inference, impl=self.impl)
        return {"retrieved": retrieved, "weights": effective_weights(attend, q, k)}

    def __call__(self, x, *, positions, cache=None, mode: str = "train"):
        check_mode(mode, cache)
        B, T, _ = x.shape
        H, G, hd, l = self.num_heads, self.num_kv_heads, self.head_dim, self.block
        q_raw = self.q_proj(x).reshape(B, T, H, hd)
        k_raw = self.k_proj(x).reshape(B, T, G, hd)
        v = self.v_proj(x).reshape(B, T, G, hd)
        q = constrain(apply_rope(q_raw, positions, theta=self.rope_theta,
                                 scaling=self.rope_scaling),
                      ("batch", "length", "act_heads", None))
        k = apply_rope(k_raw, positions, theta=self.rope_theta, scaling=self.rope_scaling)

        if mode == "train":
            s_land = landmark_scores(q_raw, self._landmarks(k_raw))
            y = grouped_softmax_attention(q, k, v, s_land, block=l)
        elif mode == "prefill":
            # blocks are counted from the segment start; generation prefills from position 0
            start = positions[0, 0]
            kl = self._landmarks(k_raw)                                    # [B, ceil(T/l), G, hd]
            put = jax.lax.dynamic_update_slice_in_dim
            cache = {"k": put(cache["k"], k.astype(cache["k"].dtype), start, 1),
                     "v": put(cache["v"], v.astype(cache["v"].dtype), start, 1),
                     "kl": put(cache["kl"], kl.astype(cache["kl"].dtype), start // l, 1)}
            y = landmark_retrieval_attention(q, k, v, landmark_scores(q_raw, kl), block=l,
                                             top_k=self.top_k, formula=self.inference,
                                             impl=self.impl, report=self.report_cost)
        else:
            if T != 1:
                raise ValueError(f"mode='decode' takes one token per call, got T={T}")
            y, cache = self._decode(q, q_raw, k, v, positions, cache)
        y = y.astype(x.dtype).reshape(B, T, H * hd)
        return self.o_proj(y), cache

    def _decode(self, q, q_raw, k, v, positions, cache):
        l = self.block
        pos = positions[0, 0]
        kc = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, 1)
        vc = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, 1)
        # the current block's landmark from its cached keys (un-rotated), written to "kl"
        c = pos // l
        blk_pos = c * l + jnp.arange(l)
        kb = jax.lax.dynamic_slice_in_dim(kc, c * l, l, 1).astype(jnp.float32)
        kb_raw = apply_rope(kb, jnp.broadcast_to(-blk_pos, (kb.shape[0], l)),
                            theta=self.rope_theta, scaling=self.rope_scaling)
        kl_c = self._landmarks(kb_raw, blk_pos <= pos)                       # [B, 1, G, hd]
        kl = jax.lax.dynamic_update_slice_in_dim(cache["kl"], kl_c.astype(cache["kl"].dtype), c, 1)
        s_land = landmark_scores(q_raw, kl)                                # [B, H, 1, NB]
        if self.decode == "topk":
            y = retrieval_decode_attention(q, kc, vc, s_land, pos, block=l, top_k=self.top_k)
        else:
            y = grouped_softmax_attention(q, kc.astype(q.dtype), vc.astype(q.dtype), s_land,
                                          block=l, q_pos=jnp.reshape(pos, (1,)))
        return y, {"k": kc, "v": vc, "kl": kl}
