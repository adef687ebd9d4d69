"""SSA: Stochastically Subsampled self-Attention (Hussain, Zaki & Subramanian, "The Information
Pathways Hypothesis: Transformers are Dynamic Self-Ensembles", KDD 2023; no public code).

Training (mode="train", not `deterministic`): every call, each query block keeps a random, locally
biased subset of its causal key blocks; the rest are excluded from the softmax (not masked after
the fact: the block-sparse op only gathers the kept blocks, so the cost scales with the keep ratio).
Inference (eval, prefill, decode): dense causal attention; optionally a self-ensemble,
the average of `ssa_ensemble` subsampled passes.

Sampling (pinned here; the paper gives the idea, not the distribution):
  * blocks of `ssa_block_size` tokens; query block i has i + 1 causal key blocks 0..i;
  * it keeps exactly n_i = clip(round(r (i + 1)), n_forced, i + 1) of them, r = `ssa_keep_ratio`;
  * forced: the diagonal block i, and block 0 if `ssa_keep_first` (an attention sink);
  * the others are drawn without replacement with probability weights exp(-a (i - j)) decaying
    with the block distance, a = `ssa_locality` (0: uniform), via the Gumbel-top-k trick;
  * independent draws per batch element, head and query block.
  The number of kept blocks is fixed per query block, so the BlockMask has a static width
  max_i n_i and the jitted cost is deterministic.
Randomness: an nnx RngStream forked at construction from `rngs.ssa` (falls back to the default
stream), stored on the module like nnx.Dropout's; each training call draws a fresh key. Where the
trace does not allow the stream's count to change (a plain jax.grad over nnx.merge inside the
function, as trainer/ does), the current count is read without advancing. Either way the key is
folded with a hash of the layer's input, so distinct batches get distinct masks. Self-ensemble
draws use fixed keys derived from the stream's key (not its count): inference stays deterministic.
`deterministic` (False at construction) is set by `model.eval()` / `nnx.view(model,
deterministic=True)`; with it, mode="train" is dense too.
Same projections (names, shapes, logical axes) as SoftmaxAttention: a softmax checkpoint loads
(the paper's recipe ends with a short dense fine-tune: set deterministic=True or ssa_keep_ratio=1).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention.ops.block_sparse import IMPLS, BlockMask, block_sparse_attention
from attention.registry import register, set_options
from attention.softmax import SoftmaxAttention


def kept_block_counts(num_blocks: int, keep_ratio: float, keep_first: bool) -> np.ndarray:
    """int [NQ]: how many causal key blocks each query block keeps (static)."""
    i = np.arange(num_blocks)
    forced = 1 + ((i > 0) & keep_first)
    n = np.floor(keep_ratio * (i + 1) + 0.5).astype(np.int64)
    return np.clip(n, forced, i + 1)


def sample_block_mask(key, batch: int, heads: int, T: int, block: int, *, keep_ratio: float,
                      locality: float, keep_first: bool = True) -> BlockMask:
    """A random causal BlockMask [batch, heads, NQ, NK] (NQ = NK = ceil(T / block)) keeping
    kept_block_counts(...)[i] key blocks for query block i, locally biased (see the module doc)."""
    n = math.ceil(T / block)
    counts = kept_block_counts(n, keep_ratio, keep_first)
    width = int(counts.max())
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n)[None, :]
    forced = (j == i) | ((j == 0) & keep_first)
    gumbel = jax.random.gumbel(key, (batch, heads, n, n), jnp.float32)
    # SSA (Hussain et al. 2023): locally biased random subsampling of the keys; the
    # Gumbel-top-k draw samples without replacement with weights exp(-a |i - j|)
    score = jnp.where(forced, jnp.inf, jnp.where(j <= i, gumbel - locality * (i - j), -jnp.inf))
    idx = jax.lax.top_k(score, width)[1]                        # [B, H, NQ, width]
    idx = jnp.where(jnp.arange(width) < jnp.asarray(counts)[:, None], idx, -1)
    return BlockMask.from_indices(idx, n, block, block, q_len=T, k_len=T)


@register("ssa")
class SSAAttention(SoftmaxAttention):
    """x [B, T, D] -> [B, T, D]: SoftmaxAttention with stochastically subsampled key blocks in
    training. Config (config.model): the softmax fields plus CONFIG_DEFAULTS (a config without
    them gets these values)."""

    OPTION_PREFIX = "ssa"
    CONFIG_DEFAULTS = {
        "ssa_keep_ratio": 0.25,    # fraction of the causal key blocks each query block keeps
        "ssa_block_size": 64,      # tokens per query / key block
        "ssa_locality": 0.5,       # log-weight decay per block of distance (0: uniform)
        "ssa_keep_first": True,    # always keep key block 0
        "ssa_ensemble": 1,         # inference: average of this many subsampled passes (1: dense)
        "ssa_impl": "auto",        # block_sparse_attention impl
    }
    OPTION_RULES = {"ssa_keep_ratio": "(0, 1]", "ssa_block_size": ">= 1", "ssa_locality": ">= 0",
                    "ssa_ensemble": ">= 1", "ssa_impl": IMPLS}

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        set_options(self, cfg, "ssa")  # self.keep_ratio = ssa_keep_ratio, ...
        # forked after the projections (which initialise exactly as SoftmaxAttention's)
        self.rngs = rngs["ssa"].fork()
        self.deterministic = False  # True (model.eval() / nnx.view): dense in mode="train"

    def _sampled(self, q, k, v, key):
        B, T, H, _ = q.shape
        mask = sample_block_mask(key, B, H, T, min(self.block_size, T),
                                 keep_ratio=self.keep_ratio, locality=self.locality,
                                 keep_first=self.keep_first)
        return block_sparse_attention(q, k, v, mask, causal=True, impl=self.impl, caller="SSA")

    def attend(self, q, k, v, *, mode: str):
        if mode == "train" and not self.deterministic:
            # a hash of the input salts the key (see the module doc)
            salt = jax.lax.bitcast_convert_type(
                jnp.sum(jax.lax.stop_gradient(q[..., :1]).astype(jnp.float32)), jnp.uint32)
            if getattr(self.rngs.count, "_can_update", True):
                key = self.rngs()
            else:  # the count cannot advance in this trace: the salt alone varies the draw
                key = jax.random.fold_in(self.rngs.key[...], self.rngs.count[...])
            return self._sampled(q, k, v, jax.random.fold_in(key, salt))
        if self.ensemble == 1:
            return super().attend(q, k, v, mode=mode)
        # self-ensemble (Hussain et al. 2023): mean of n subsampled passes, fixed keys
        base = jax.random.fold_in(self.rngs.key[...], 0x55A)
        ys = [self._sampled(q, k, v, jax.random.fold_in(base, e)).astype(jnp.float32)
              for e in range(self.ensemble)]
        return (sum(ys) / self.ensemble).astype(q.dtype)
