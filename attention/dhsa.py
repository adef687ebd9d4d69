"""DHSA — Dynamic Hierarchical Sparse Attention (Xiong et al., "Long-Context Modeling with
Dynamic Hierarchical Sparse Attention for On-Device LLMs", 2025; xiongsiheng/DHSA), as a
training-free prefill mechanism over the block-sparse op.

The paper segments the sequence into variable-length chunks with a small trained boundary
predictor. That predictor is *not* implemented (nothing here is trained): the sequence is cut into
fixed-size chunks of `dhsa_chunk_size` tokens (the last one may be shorter). Then, per head:
  1. chunk representations by the paper's length-normalised aggregation:
        k_c = mean(k_j, j in c) * sqrt(|c|),   q_c = mean(q_i, i in c) * sqrt(|c|);
  2. chunk-level similarity S_c = q_c k_c^T, causal at the chunk level (key chunk <= query
     chunk), upsampled to tokens, S[i, j] = S_c[chunk(i), chunk(j)] (`dhsa_token_scores`;
     the paper's chunk-level similarity, upsampled to token level);
  3. pooled to (query block, key block) scores: mean over the query block's chunks of the max
     over the key block's chunks (the token-level scores pooled the same way, since chunks tile
     blocks: the chunk size must divide both block sizes);
  4. per query block keep the top-N key blocks (N = dhsa_topk / block_k; the paper keeps top-N
     tokens, the op's unit is a key block) among the causal blocks outside the local window, plus
     the most recent `dhsa_window` tokens and the diagonal block (and optional sinks);
  5. `block_sparse_attention` over those blocks, causal within them.

The layer: SoftmaxAttention's parameters and call shape (a softmax LM checkpoint loads unchanged);
`attend` is sparse in mode "prefill" (and "train" when `dhsa_in_train`), dense causal otherwise.
The block-mask helpers are HiP's (attention/hip.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attention.hip import BlockSparsePrefillAttention, topk_block_mask
from attention.ops.block_sparse import BlockMask
from attention.registry import register


def chunk_means(x, chunk: int):
    """x [B, T, Hx, D] -> (length-normalised chunk sums [B, Hx, NC, D] f32, i.e. mean * sqrt(n),
    chunk lengths [NC]). Fixed-size chunks; the last may be partial."""
    B, T, Hx, D = x.shape
    nc = -(-T // chunk)
    xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, nc * chunk - T), (0, 0), (0, 0)])
    total = xp.reshape(B, nc, chunk, Hx, D).sum(axis=2).transpose(0, 2, 1, 3)
    n = jnp.minimum(chunk, T - jnp.arange(nc) * chunk).astype(jnp.float32)     # [NC]
    # DHSA chunk representation, length-normalised aggregation: mean(x in c) * sqrt(|c|)
    return total / jnp.sqrt(n)[:, None], n


def dhsa_chunk_scores(q, k, chunk: int):
    """q [B, T, H, D], k [B, T, H_kv, D] -> chunk-level scores S_c = q_c k_c^T f32
    [B, H, NC, NC], -inf where the key chunk lies after the query chunk (causal)."""
    H, Hk = q.shape[2], k.shape[2]
    qc, _ = chunk_means(jax.lax.stop_gradient(q), chunk)                # [B, H, NC, D]
    kc, _ = chunk_means(jax.lax.stop_gradient(k), chunk)                # [B, Hk, NC, D]
    kc = jnp.repeat(kc, H // Hk, axis=1)                                # GQA: per query head
    s = jnp.einsum("bhid,bhjd->bhij", qc, kc)                           # DHSA: S_c = q_c k_c^T
    nc = s.shape[-1]
    return jnp.where(jnp.arange(nc)[None, :] <= jnp.arange(nc)[:, None], s, -jnp.inf)


def dhsa_token_scores(q, k, chunk: int):
    """The chunk scores upsampled to tokens: f32 [B, H, T, T], S[i, j] = S_c[i // c, j // c]
    (constant on every chunk x chunk tile). O(T^2): for inspection and tests, not the layer."""
    T = q.shape[1]
    s = dhsa_chunk_scores(q, k, chunk)
    return jnp.repeat(jnp.repeat(s, chunk, axis=-2), chunk, axis=-1)[..., :T, :T]


def dhsa_block_scores(q, k, *, chunk: int, block_q: int, block_k: int):
    """(query block, key block) relevance f32 [B, H, NQ, NK]: mean over the query block's chunks
    of the max over the key block's chunks of S_c (-inf where no key chunk is causal)."""
    if block_q % chunk or block_k % chunk:
        raise ValueError(f"DHSA: dhsa_chunk_size={chunk} must divide dhsa_block_q={block_q} and "
                         f"dhsa_block_k={block_k}")
    T = q.shape[1]
    s = dhsa_chunk_scores(q, k, chunk)                                  # [B, H, NC, NC]
    B, H, nc, _ = s.shape
    nq, nk = -(-T // block_q), -(-T // block_k)
    cq, ck = block_q // chunk, block_k // chunk
    s = jnp.pad(s, [(0, 0), (0, 0), (0, nq * cq - nc), (0, nk * ck - nc)],
                constant_values=-jnp.inf)
    s = jnp.max(s.reshape(B, H, nq * cq, nk, ck), axis=-1)              # max over key chunks
    s = s.reshape(B, H, nq, cq, nk)
    # mean over the query block's real chunks where the key block is causal for them
    ok = jnp.isfinite(s)
    total = jnp.sum(jnp.where(ok, s, 0.0), axis=3)
    cnt = jnp.sum(ok, axis=3)
    return jnp.where(cnt > 0, total / jnp.maximum(cnt, 1), -jnp.inf)


def dhsa_block_mask(q, k, *, chunk: int, top_k_tokens: int, block_q: int, block_k: int,
                    window: int, sink_tokens: int = 0) -> BlockMask:
    """The DHSA BlockMask [B, H, NQ, NK]: per query block the top ceil(top_k_tokens / block_k)
    key blocks by `dhsa_block_scores`, plus the diagonal, the local window and the sinks."""
    T = q.shape[1]
    scores = dhsa_block_scores(q, k, chunk=chunk, block_q=block_q, block_k=block_k)
    n = -(-int(top_k_tokens) // block_k)
    return topk_block_mask(scores, n, block_q=block_q, block_k=block_k, q_len=T, k_len=T,
                           sink_tokens=sink_tokens, window=window)


@register("dhsa")
class DHSAAttention(BlockSparsePrefillAttention):
    """Softmax attention whose prefill is DHSA block-sparse attention (module docstring)."""

    OPTION_PREFIX = "dhsa"
    CONFIG_DEFAULTS = {
        "dhsa_chunk_size": 16,    # fixed chunk length (the paper predicts variable boundaries)
        "dhsa_topk": 512,         # tokens (rounded up to key blocks) chosen per query block
        "dhsa_block_q": 64,       # the op's query block
        "dhsa_block_k": 64,       # the op's key block (the selection unit)
        "dhsa_window": 256,       # most recent tokens always attended
        "dhsa_sink": 0,           # attention-sink tokens at the start, always attended
        "dhsa_in_train": False,   # sparse in mode="train" too (default: dense training)
    }
    OPTION_RULES = {"dhsa_chunk_size": ">= 1", "dhsa_topk": ">= 1", "dhsa_block_q": ">= 1",
                    "dhsa_block_k": ">= 1", "dhsa_window": ">= 0", "dhsa_sink": ">= 0"}

    @staticmethod
    def validate_options(opt, cfg):
        c = opt["dhsa_chunk_size"]
        if opt["dhsa_block_q"] % c or opt["dhsa_block_k"] % c:
            raise ValueError(f"config.model.dhsa_chunk_size={c} must divide "
                             f"dhsa_block_q={opt['dhsa_block_q']} and "
                             f"dhsa_block_k={opt['dhsa_block_k']}")

    def block_mask(self, q, k) -> BlockMask:
        return dhsa_block_mask(q, k, chunk=self.dhsa_chunk_size, top_k_tokens=self.dhsa_topk,
                               block_q=self.dhsa_block_q, block_k=self.dhsa_block_k,
                               window=self.dhsa_window, sink_tokens=self.dhsa_sink)
