"""Block-sparse softmax attention: the layout (`BlockMask`) and the op every sparse mechanism
(Routing, Landmark retrieval, HiP, FlexPrefill, DHSA, SSA) ends in. Public API (DESIGN.md):

    BlockMask.from_dense(mask, block_q, block_k)       # mask: bool [B|1, H|1, NQ, NK]
    block_sparse_attention(q, k, v, mask, *, causal=False, scale=None, impl="auto",
                           return_lse=False) -> o  or  (o, lse)

q: [B, T, H, D]; k, v: [B, S, H_kv, D] (H a multiple of H_kv: grouped-query heads share the
mask of their query head); o: [B, T, H, D] in q's dtype; lse: [B, H, T] f32, the log-sum-exp of
each row's scaled scores over the keys it may see (-inf for a row that sees none, whose o is 0).
Query block i may see key block j iff the mask allows (i, j); with causal=True additionally key
position <= query position (both counted from 0). Any T and S: the last blocks may be partial.

impl:
  "reference": dense masked softmax in f32 (materialises T x S), the ground truth;
  "xla": gathers each query block's active key blocks; cost grows with the number of active
         blocks, not T x S;
  "pallas": the flash-style kernels in pallas_kernels/block_sparse (forward and backward, custom
         VJP): Mosaic on TPU, Triton on GPU (lowered in the tests, not yet timed on a GPU),
         interpret mode on CPU;
  "auto": pallas on TPU (any block sizes), else xla (warning once on GPU, until its kernels
         are timed there).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform

IMPLS = ("auto", "pallas", "xla", "reference")


class SparseImplOption:
    """The config.model option of the mechanisms that run block_sparse_attention at prefill
    (HiP, DHSA, FlexPrefill): declared once here, inherited by each (attention.registry)."""

    OPTION_PREFIX = "sparse"
    CONFIG_DEFAULTS = {"sparse_impl": "auto"}  # block_sparse_attention impl
    OPTION_RULES = {"sparse_impl": IMPLS}
_MASK_ARRAYS = ("counts", "indices", "t_counts", "t_indices")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Which key blocks each query block attends to, in the two layouts the kernels need.

    counts   int32 [Bm, Hm, NQ]        active key blocks per query block (>= 1)
    indices  int32 [Bm, Hm, NQ, MK]    their key-block indices, ascending; slots >= count repeat
                                       the last active index (a re-fetch of the same block is free
                                       in a pipelined kernel, as in splash attention)
    t_counts  int32 [Bm, Hm, NK]       query blocks attending each key block (may be 0)
    t_indices int32 [Bm, Hm, NK, MQ]   their query-block indices, ascending, padded the same way
                                       (0 where t_count is 0): the dK / dV backward iterates these
    block_q, block_k, q_len, k_len     static: block sizes and the (unpadded) sequence lengths

    Bm is 1 or the batch, Hm is 1 or the number of query heads (broadcast when 1).
    """
    counts: jax.Array
    indices: jax.Array
    t_counts: jax.Array
    t_indices: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_k: int = dataclasses.field(metadata=dict(static=True))
    q_len: int = dataclasses.field(metadata=dict(static=True))
    k_len: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[-1]

    @property
    def num_k_blocks(self) -> int:
        return self.t_counts.shape[-1]

    @property
    def max_blocks(self) -> int:
        """MK: the most key blocks any query block attends to (the indices' last dim)."""
        return self.indices.shape[-1]

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, mask, block_q: int, block_k: int, *, q_len: int | None = None,
                   k_len: int | None = None, max_blocks: int | None = None,
                   max_q_blocks: int | None = None) -> "BlockMask":
        """mask: bool [Bm, Hm, NQ, NK] (or [NQ, NK]), True where query block i may see key block j.

        q_len / k_len default to NQ * block_q / NK * block_k. max_blocks (MK) defaults to the
        largest row count when the mask is concrete, NK when traced; a row with more active
        blocks than max_blocks is an error when concrete. An all-False row is an error when the
        mask is concrete; under jit it cannot be checked, and such a row attends to nothing
        (o = 0, lse = -inf) rather than producing NaN."""
        mask = jnp.asarray(mask)
        if mask.ndim == 2:
            mask = mask[None, None]
        if mask.ndim != 4 or mask.dtype != jnp.bool_:
            raise ValueError(f"BlockMask.from_dense: mask must be bool [Bm, Hm, NQ, NK] "
                             f"(or [NQ, NK]); got {mask.dtype} {mask.shape}")
        _, _, NQ, NK = mask.shape
        q_len = NQ * block_q if q_len is None else int(q_len)
        k_len = NK * block_k if k_len is None else int(k_len)
        for name, length, size, n in (("q_len", q_len, block_q, NQ), ("k_len", k_len, block_k, NK)):
            if size < 1 or -(-length // size) != n:
                raise ValueError(f"BlockMask.from_dense: {name}={length} with block size {size} "
                                 f"needs {-(-length // max(size, 1))} blocks, the mask has {n}")
        concrete = not isinstance(mask, jax.core.Tracer)
        if concrete:
            m = np.asarray(mask)
            empty = np.argwhere(~m.any(-1))
            if len(empty):
                b, h, i = empty[0]
                raise ValueError(f"BlockMask: query block {i} (batch {b}, head {h}) attends to no "
                                 f"key block; every query block needs at least one "
                                 f"({len(empty)} empty rows)")
            need = int(m.sum(-1).max())
            if max_blocks is not None and need > max_blocks:
                raise ValueError(f"BlockMask: a query block has {need} active key blocks, more "
                                 f"than max_blocks={max_blocks}")
            max_blocks = need if max_blocks is None else max_blocks
            max_q_blocks = (int(m.sum(-2).max(initial=1)) or 1) if max_q_blocks is None else max_q_blocks
        max_blocks = NK if max_blocks is None else min(int(max_blocks), NK)
        max_q_blocks = NQ if max_q_blocks is None else min(int(max_q_blocks), NQ)
        counts, indices = _compress(mask, max_blocks)
        t_counts, t_indices = _compress(jnp.swapaxes(mask, -1, -2), max_q_blocks)
        return cls(counts, indices, t_counts, t_indices, block_q, block_k, q_len, k_len)

    @classmethod
    def from_indices(cls, indices, num_k_blocks: int, block_q: int, block_k: int, *,
                     q_len: int | None = None, k_len: int | None = None) -> "BlockMask":
        """indices: int [Bm, Hm, NQ, k] key-block indices per query block (any order, duplicates
        allowed, negative or >= num_k_blocks entries ignored), e.g. a top-k selection."""
        indices = jnp.asarray(indices)
        if indices.ndim != 4:
            raise ValueError(f"BlockMask.from_indices: indices must be [Bm, Hm, NQ, k]; got "
                             f"{indices.shape}")
        onehot = indices[..., None] == jnp.arange(num_k_blocks)
        dense = jnp.any(onehot & (indices[..., None] >= 0), axis=-2)
        return cls.from_dense(dense, block_q, block_k, q_len=q_len, k_len=k_len,
                              max_blocks=min(indices.shape[-1], num_k_blocks))

    def check_fits(self, batch: int, heads: int, q_len: int, k_len: int, who: str) -> None:
        """ValueError naming `who` unless this mask was built for q_len x k_len and its batch /
        head dims are 1 or (batch, heads)."""
        if (self.q_len, self.k_len) != (q_len, k_len):
            raise ValueError(f"{who}: the mask was built for q_len={self.q_len}, "
                             f"k_len={self.k_len}; got T={q_len}, S={k_len}")
        mb, mh = self.counts.shape[:2]
        if mb not in (1, batch) or mh not in (1, heads):
            raise ValueError(f"{who}: mask batch/head dims ({mb}, {mh}) must be 1 or "
                             f"({batch}, {heads})")

    def to_dense(self) -> jax.Array:
        """bool [Bm, Hm, NQ, NK] from the forward layout."""
        slot = jnp.arange(self.max_blocks) < self.counts[..., None]
        hit = (self.indices[..., None] == jnp.arange(self.num_k_blocks)) & slot[..., None]
        return jnp.any(hit, axis=-2)

    def to_dense_transposed(self) -> jax.Array:
        """bool [Bm, Hm, NQ, NK] from the transposed (dK / dV) layout."""
        slot = jnp.arange(self.t_indices.shape[-1]) < self.t_counts[..., None]
        hit = (self.t_indices[..., None] == jnp.arange(self.num_q_blocks)) & slot[..., None]
        return jnp.swapaxes(jnp.any(hit, axis=-2), -1, -2)

    def pairs(self, causal: bool) -> jax.Array:
        """(query, key) token pairs the op computes under this mask, per [Bm, Hm] (f32): the
        attention cost, to compare with T * S (or T (T + 1) / 2 for dense causal)."""
        per_block = np.zeros((self.num_q_blocks, self.num_k_blocks), np.float64)
        r = np.arange(self.q_len)
        for j in range(self.num_k_blocks):  # keys of block j each query row may see
            lo, hi = j * self.block_k, min((j + 1) * self.block_k, self.k_len) - 1
            seen = np.clip((np.minimum(r, hi) if causal else np.full_like(r, hi)) - lo + 1, 0, None)
            per_block[:, j] = np.bincount(r // self.block_q, seen, self.num_q_blocks)
        return jnp.sum(jnp.where(self.to_dense(), jnp.asarray(per_block, jnp.float32), 0.0),
                       axis=(-1, -2))

    def sequence_pairs(self, num_heads: int, causal: bool) -> jax.Array:
        """Scalar: the pairs computed for one sequence, summed over the op's num_heads query heads
        (a mask broadcast over heads counts once per head), averaged over the batch."""
        p = self.pairs(causal)
        return jnp.mean(jnp.sum(p, -1)) * (num_heads // p.shape[-1])

    def density(self) -> jax.Array:
        """Fraction of (query block, key block) pairs that are active, per [Bm, Hm]."""
        return jnp.sum(self.counts, -1) / (self.num_q_blocks * self.num_k_blocks)


def _compress(mask, width: int):
    """bool [..., R, N] -> (count [..., R], ascending active indices [..., R, width]) padded by
    repeating the last active index (0 for an empty row)."""
    n = mask.shape[-1]
    # a stable ascending sort of (inactive, index) puts the active indices first, in order
    key = jnp.where(mask, 0, n) + jnp.arange(n, dtype=jnp.int32)
    order = jnp.sort(key, axis=-1)[..., :width] % n
    count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    slot = jnp.arange(width) < count[..., None]
    return count, jnp.where(slot, order, jnp.where(count[..., None] > 0, last, 0)).astype(jnp.int32)


# ------------------------------------------------------------------ block patterns (bool)
def causal_blocks(num_q_blocks: int, num_k_blocks: int, block_q: int, block_k: int):
    """bool [NQ, NK]: key blocks holding at least one position <= some query of the block."""
    i = jnp.arange(num_q_blocks)[:, None]
    j = jnp.arange(num_k_blocks)[None, :]
    return j * block_k <= (i + 1) * block_q - 1


def local_blocks(num_q_blocks: int, num_k_blocks: int, block_q: int, block_k: int, window: int):
    """bool [NQ, NK]: key blocks overlapping [first query - window + 1, last query] of the block
    (a causal sliding window of `window` tokens)."""
    i = jnp.arange(num_q_blocks)[:, None]
    j = jnp.arange(num_k_blocks)[None, :]
    lo = i * block_q - window + 1
    return ((j + 1) * block_k - 1 >= lo) & (j * block_k <= (i + 1) * block_q - 1)


def sink_blocks(num_q_blocks: int, num_k_blocks: int, block_k: int, sink_tokens: int):
    """bool [NQ, NK]: the key blocks holding the first `sink_tokens` positions (attention sinks)."""
    j = jnp.arange(num_k_blocks)[None, :]
    return jnp.broadcast_to(j * block_k < sink_tokens, (num_q_blocks, num_k_blocks))


# ------------------------------------------------------------------ the op
def _check(q, k, v, mask):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or k.shape[0] != q.shape[0] \
            or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"block_sparse_attention: q must be [B, T, H, D] and k, v [B, S, H_kv, D] "
                         f"with q's B and D; got q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, H, _ = q.shape
    if H % k.shape[2]:
        raise ValueError(f"block_sparse_attention: {H} query heads is not a multiple of "
                         f"{k.shape[2]} key/value heads")
    if not isinstance(mask, BlockMask):
        raise TypeError(f"block_sparse_attention: mask must be a BlockMask, got {type(mask).__name__}")
    mask.check_fits(B, H, T, k.shape[1], "block_sparse_attention")


def block_sparse_attention(q, k, v, mask: BlockMask, *, causal: bool = False, scale=None,
                           impl: str = "auto", return_lse: bool = False,
                           caller: str = "block_sparse_attention"):
    """softmax(scale q k^T + M) v with M = 0 on the allowed (block, causal) entries, -inf elsewhere.
    Returns o [B, T, H, D] (and lse [B, H, T] f32 when return_lse). caller: the mechanism, named
    in the one-time warning when impl="auto" cannot take the kernel on an accelerator."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = resolve_impl(impl, mask, caller)
    if impl == "reference":
        o, lse = block_sparse_reference(q, k, v, mask, causal=causal, scale=scale)
    elif impl == "xla":
        o, lse = block_sparse_xla(q, k, v, mask, causal=causal, scale=scale)
    else:
        kernel = _pallas()
        if kernel is None:
            raise RuntimeError("impl='pallas': pallas_kernels.block_sparse is not available in "
                               "this build; use impl='xla'")
        arrays = (mask.counts, mask.indices, mask.t_counts, mask.t_indices)

        def run(q, k, v, *arrays):
            local = dataclasses.replace(mask, **dict(zip(_MASK_ARRAYS, arrays)))
            return kernel(q, k, v, local, causal=causal, scale=scale)

        # a sharded model runs the kernel per device on its batch / head slice (mask arrays
        # [Bm, Hm, ...] are split with q where they are not broadcasts)
        o, lse = platform.per_shard(run, (q, k, v) + arrays, batch_dims=(0,) * 7,
                                    head_dims=(2, 2, 2, 1, 1, 1, 1), out_batch_dims=(0, 0),
                                    out_head_dims=(2, 1))
    return (o, lse) if return_lse else o


def resolve_impl(impl: str, mask: BlockMask, caller: str = "block_sparse_attention") -> str:
    """The path `block_sparse_attention(..., impl=impl)` takes for `mask` here: "auto" is the
    Pallas kernel on TPU (any block sizes), else xla, said once (naming `caller` and why) on an
    accelerator that does not take the kernel; other impls are themselves."""
    if impl != "auto":
        return impl
    # the Mosaic kernels on TPU; the GPU kernels (impl="pallas") are not yet timed against xla
    # on a GPU (bench/gpu.py does), so GPU and CPU take the xla path
    if platform.backend() == "tpu" and _pallas_supported(mask):
        return "pallas"
    if platform.backend() != "cpu":
        platform.note_fallback(
            caller, "block-sparse", "pallas_kernels.block_sparse is not importable"
            if platform.backend() == "tpu" else
            "its GPU kernels (impl='pallas') are not yet timed against the XLA path on a GPU")
    return "xla"


def _pallas():
    try:
        from pallas_kernels.block_sparse import block_sparse_pallas
    except ImportError:
        return None
    return block_sparse_pallas


def _pallas_supported(mask) -> bool:
    try:
        from pallas_kernels.block_sparse import pallas_supported
    except ImportError:
        return False
    return pallas_supported(mask)


def _expand_kv(q, k, v):
    """Grouped-query heads: repeat each key/value head for the query heads that share it."""
    rep = q.shape[2] // k.shape[2]
    return (k, v) if rep == 1 else (jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2))


def _masked_softmax(s, allowed, v_dtype):
    """Row softmax of f32 scores s [..., N] over `allowed`; rows with nothing allowed give zero
    probabilities and lse = -inf (never NaN)."""
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(allowed, jnp.exp(s - m_safe), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return p / jnp.where(l > 0, l, 1.0), lse


def block_sparse_reference(q, k, v, mask: BlockMask, *, causal: bool, scale: float):
    """Dense masked softmax in f32: the token mask is the block mask upsampled (and causal)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    k, v = _expand_kv(q, k, v)
    f32 = jnp.float32
    dense = mask.to_dense()                                          # [Bm, Hm, NQ, NK]
    tok = jnp.repeat(jnp.repeat(dense, mask.block_q, -2)[..., :T, :], mask.block_k, -1)[..., :S]
    if causal:
        tok = tok & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
    s = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k.astype(f32)) * scale
    p, lse = _masked_softmax(s, tok, v.dtype)
    o = jnp.einsum("bhts,bshd->bthd", p, v.astype(f32))
    return o.astype(q.dtype), lse


def block_sparse_xla(q, k, v, mask: BlockMask, *, causal: bool, scale: float):
    """Per query block, gather its MK active key blocks and run a masked softmax over them:
    O(T * MK * block_k) work and memory instead of O(T * S). Differentiable by autodiff (the
    gather's transpose is a scatter-add into dK / dV)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    bq, bk = mask.block_q, mask.block_k
    NQ, NK, MK = mask.num_q_blocks, mask.num_k_blocks, mask.max_blocks
    k, v = _expand_kv(q, k, v)
    f32 = jnp.float32
    qp = jnp.pad(q, [(0, 0), (0, NQ * bq - T), (0, 0), (0, 0)])
    kp, vp = (jnp.pad(x, [(0, 0), (0, NK * bk - S), (0, 0), (0, 0)]) for x in (k, v))
    qb = qp.reshape(B, NQ, bq, H, D).transpose(0, 3, 1, 2, 4)        # [B, H, NQ, bq, D]
    kb, vb = (x.reshape(B, NK, bk, H, D).transpose(0, 3, 1, 2, 4) for x in (kp, vp))
    idx = jnp.broadcast_to(mask.indices, (B, H, NQ, MK))
    cnt = jnp.broadcast_to(mask.counts, (B, H, NQ))
    flat = idx.reshape(B, H, NQ * MK)
    kg = jnp.take_along_axis(kb, flat[..., None, None], axis=2).reshape(B, H, NQ, MK * bk, D)
    vg = jnp.take_along_axis(vb, flat[..., None, None], axis=2).reshape(B, H, NQ, MK * bk, D)
    s = jnp.einsum("bhiqd,bhikd->bhiqk", qb.astype(f32), kg.astype(f32)) * scale
    # allowed: a real slot (< count), a real key (< S), and causal if asked
    key_pos = (idx[..., None] * bk + jnp.arange(bk)).reshape(B, H, NQ, 1, MK * bk)
    slot = jnp.repeat(jnp.arange(MK) < cnt[..., None], bk, axis=-1)[..., None, :]
    allowed = slot & (key_pos < S)
    if causal:
        q_pos = (jnp.arange(NQ)[:, None] * bq + jnp.arange(bq))[:, :, None]  # [NQ, bq, 1]
        allowed = allowed & (key_pos <= q_pos)
    p, lse = _masked_softmax(s, allowed, v.dtype)
    o = jnp.einsum("bhiqk,bhikd->bhiqd", p, vg.astype(f32))
    o = o.transpose(0, 2, 3, 1, 4).reshape(B, NQ * bq, H, D)[:, :T]
    lse = lse.reshape(B, H, NQ * bq)[..., :T]
    return o.astype(q.dtype), lse


def dense_causal_mask(T: int, S: int, block_q: int, block_k: int, **kw) -> BlockMask:
    """The block mask of plain causal attention (every block at or below the diagonal)."""
    nq, nk = math.ceil(T / block_q), math.ceil(S / block_k)
    return BlockMask.from_dense(causal_blocks(nq, nk, block_q, block_k), block_q, block_k,
                                q_len=T, k_len=S, **kw)
