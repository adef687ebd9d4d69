"""Routing Transformer attention (Roy, Saffar, Vaswani & Grangier, "Efficient Content-Based Sparse
Attention with Routing Transformers", TACL 2021; reference code: google-research
routing_transformer).

Heads are split in two groups (the paper mixes local and routing heads in its models):
  * local heads (the first `routing_local_heads`): causal sliding-window attention over
    `routing_local_window` tokens, rounded out to whole key blocks of 64 tokens (the
    `local_blocks` pattern: every key block overlapping the window, causal inside);
  * routed heads (the rest): online k-means routing. Per routed head h, with centroids
    mu_h [C, d] (C = `routing_num_clusters`):
        q^ = LN(q), k^ = LN(k)                    (layer norm without affine, Alg. 1)
        score_tc = (q^_t + k^_t) . mu_c           (shared membership, see below)
        cluster c takes the w tokens of largest score_tc (top-w over the sequence: balanced
        clusters, Sec. 4), w = ceil(T / C) unless `routing_cluster_size` is set;
    the members are sorted by position and gathered ([C * w] tokens), attend to each other
    causally through `block_sparse_attention` with a block-diagonal BlockMask (block w, causal=True:
    positions ascend inside a cluster, so index order is position order), and each output is
    scattered back to its token, averaged over the token's memberships (Alg. 1).

Pinned choices (the paper leaves them open or they follow from this code base):
  * Shared membership: one token set per cluster for both queries and keys (the paper routes Q and
    K separately with shared centroids). With the same set, causality is an index comparison in
    the gathered sequence, which the block-sparse op does; the score (q^ + k^) . mu ranks tokens by
    the summed squared distance ||q^ - mu||^2 + ||k^ - mu||^2 (|q^|, |k^| fixed by the LN).
  * Routing uses q and k *after* RoPE: they are the vectors whose dot product is the attention
    logit, and routing approximates the top-scoring (MIPS) keys of each query (Sec. 4).
  * A token that no cluster takes (possible: top-w per cluster) attends, in that routed head,
    to itself only (its output is its own value), so every token has a defined output.
  * No output reads a later token (d y_i / d x_j = 0 for j > i), but, as in the paper, the
    balanced top-w *membership* is decided over the whole segment: a later token can displace
    an earlier one from a cluster (a discrete, gradient-free dependence). With one cluster and
    w = T there is none (and the layer equals causal softmax attention). `routing_membership=
    "causal"` removes it: each token joins its nearest centroid (by the same summed distance) and
    each cluster keeps its first w tokens in position order (later overflow tokens get no
    cluster), so nothing an earlier output depends on is decided by a later token; clusters are
    then capacity-limited rather than balanced.
  * Centroids [H_routed, C, d] (`Centroids`, a non-trainable nnx.Variable, replicated) are
    updated in mode="train" unless `deterministic` (set by `model.eval()` / `nnx.view`), and only
    where the trace allows the Variable to change (nnx transforms do; a plain jax.grad over
    nnx.merge inside the function does not: then the update is skipped with a warning), by the
    EMA of the assigned means: mu_c <- lam mu_c + (1 - lam) mean{x in q^ U k^ : argmin_c' |x -
    mu_c'| = c} over the batch and sequence (decay lam = 0.999); a cluster with no assigned vector
    keeps its centroid. The commitment loss beta * mean_{b,t,h}(|q^ - sg(mu(q^))|^2 +
    |k^ - sg(mu(k^))|^2), beta = 1e-4, is sown as nnx.Intermediate "aux_loss" (train and prefill).
  * Decoding (mode="decode") is dense attention over the KV cache (SoftmaxAttention's path), so
    a routed model's cached generation differs from re-running the prompt through routing.
Same projections (names, shapes, logical axes) as SoftmaxAttention: a softmax checkpoint loads.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from attention.ops.block_sparse import IMPLS, BlockMask, block_sparse_attention, local_blocks
from attention.registry import register, set_options
from attention.softmax import SoftmaxAttention

_LN_EPS = 1e-6
_LOCAL_BLOCK = 64  # block size of the local heads' sliding window


_warned = False


def _warn_frozen():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("RoutingAttention: called in mode='train' where its centroids cannot be "
                      "updated (a plain jax transform over a merged model, e.g. jax.grad of "
                      "nnx.merge(...)); the EMA update is skipped. Use nnx transforms, or return "
                      "the non-parameter state from the transformed function.", stacklevel=3)


class Centroids(nnx.Variable):
    """k-means centroids of the routed heads: updated by EMA, never by the optimizer."""


def layer_norm(x, eps: float = _LN_EPS):
    """Layer norm over the last axis without scale or bias (f32)."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


def nearest_centroid(x, mu):
    """x [B, T, R, d], mu [R, C, d] -> int32 [B, T, R]: argmin_c |x - mu_c|^2."""
    d2 = (jnp.sum(mu * mu, -1)[None, None]                      # [1, 1, R, C]
          - 2.0 * jnp.einsum("btrd,rcd->btrc", x, mu))
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def ema_centroids(mu, xs, decay: float):
    """The closed-form EMA step of the centroids: mu [R, C, d]; xs: arrays [B, T, R, d] (the
    normalised queries and keys). Returns (new mu, assignments of each x)."""
    C = mu.shape[1]
    sums = jnp.zeros_like(mu)
    counts = jnp.zeros(mu.shape[:2], jnp.float32)
    assigns = []
    for x in xs:
        a = nearest_centroid(x, mu)
        onehot = jax.nn.one_hot(a, C, dtype=jnp.float32)          # [B, T, R, C]
        sums = sums + jnp.einsum("btrc,btrd->rcd", onehot, x)
        counts = counts + jnp.sum(onehot, axis=(0, 1))
        assigns.append(a)
    mean = sums / jnp.maximum(counts, 1.0)[..., None]
    # Roy et al. 2021, Alg. 1 / Sec. 4: mu <- lam mu + (1 - lam) * (mean of the assigned vectors)
    new = jnp.where(counts[..., None] > 0, decay * mu + (1.0 - decay) * mean, mu)
    return new, assigns


def _causal_slots(assign, C: int, w: int):
    """assign int [T] (each token's nearest centroid) -> (idx [C*w], valid bool [C*w]): cluster c
    fills slots c*w .. c*w + w - 1 with its first w tokens in position order (later ones are
    dropped); unfilled slots hold token 0 and are invalid (they follow every real slot of their
    cluster, so causal attention never reads them)."""
    T = assign.shape[0]
    oh = jax.nn.one_hot(assign, C, dtype=jnp.int32)
    rank = jnp.sum(jnp.cumsum(oh, axis=0) * oh, axis=-1) - 1   # earlier tokens of its cluster
    slot = jnp.where(rank < w, assign * w + rank, C * w)              # C * w: dropped
    idx = jnp.zeros((C * w,), jnp.int32).at[slot].set(jnp.arange(T, dtype=jnp.int32), mode="drop")
    valid = jnp.zeros((C * w,), bool).at[slot].set(True, mode="drop")
    return idx, valid


def cluster_slots(q, k, mu, *, cluster_size: int, membership: str = "topw"):
    """Which tokens each centroid holds. q, k: [B, T, R, d], mu [R, C, d] -> (idx int32
    [B, R, C * w] the member positions, cluster by cluster, each ascending; valid bool
    [B, R, C * w]), w = min(cluster_size, T). membership as in routed_attention."""
    B, T, R, _ = q.shape
    C = mu.shape[1]
    w = min(cluster_size, T)
    route = layer_norm(q) + layer_norm(k)
    score = jax.lax.stop_gradient(jnp.einsum("btrd,rcd->brct", route, mu))   # [B, R, C, T]
    if membership == "topw":
        # balanced clusters: each centroid takes its top-w tokens (Roy et al. 2021, Sec. 4)
        idx = jnp.sort(jax.lax.top_k(score, w)[1], axis=-1).reshape(B, R, C * w)  # by position
        return idx, jnp.ones((B, R, C * w), bool)
    if membership == "causal":
        # |q^ - mu|^2 + |k^ - mu|^2 = const - 2 (q^ + k^) . mu + 2 |mu|^2
        near = jnp.argmax(score - jnp.sum(mu * mu, -1)[None, :, :, None], axis=2)  # [B, R, T]
        return jax.vmap(jax.vmap(lambda a: _causal_slots(a, C, w)))(near)
    raise ValueError(f"routing membership must be 'topw' or 'causal', got {membership!r}")


def routed_attention(q, k, v, mu, *, cluster_size: int, membership: str = "topw",
                     impl: str = "auto"):
    """Clustered causal attention. q, k, v: [B, T, R, d] (one key/value head per query head),
    mu [R, C, d]. membership "topw" (the paper): each cluster takes the cluster_size tokens of
    largest (LN(q)+LN(k)) . mu_c; "causal": each token goes to its nearest centroid (by the summed
    q / k distance) and each cluster keeps its first cluster_size tokens, so membership depends
    only on earlier tokens. Members attend causally inside their cluster; outputs are averaged
    over memberships; tokens in no cluster get their own value.
    Returns [B, T, R, d] in q's dtype."""
    T, d = q.shape[1], q.shape[3]
    C = mu.shape[1]
    w = min(cluster_size, T)
    f32 = jnp.float32
    idx, valid = cluster_slots(q, k, mu, cluster_size=w, membership=membership)

    def gather(x):  # [B, T, R, d] -> [B, C*w, R, d]
        xt = x.transpose(0, 2, 1, 3)
        return jnp.take_along_axis(xt, idx[..., None], axis=2).transpose(0, 2, 1, 3)

    mask = BlockMask.from_dense(jnp.eye(C, dtype=bool), w, w)   # cluster c sees only cluster c
    og = block_sparse_attention(gather(q), gather(k), gather(v), mask, causal=True, impl=impl,
                                caller="Routing (routed heads)")

    def scatter(o, i, ok):  # o [C*w, d], i, ok [C*w] -> summed outputs [T, d], memberships [T]
        ok = ok.astype(f32)
        return (jnp.zeros((T, d), f32).at[i].add(o.astype(f32) * ok[:, None]),
                jnp.zeros((T,), f32).at[i].add(ok))

    out, cnt = jax.vmap(jax.vmap(scatter))(og.transpose(0, 2, 1, 3), idx, valid)  # [B, R, T, (d)]
    out, cnt = out.transpose(0, 2, 1, 3), cnt.transpose(0, 2, 1)[..., None]
    # average over memberships (Alg. 1); a token in no cluster attends to itself only
    y = jnp.where(cnt > 0, out / jnp.maximum(cnt, 1.0), v.astype(f32))
    return y.astype(q.dtype)


@register("routing")
class RoutingAttention(SoftmaxAttention):
    """x [B, T, D] -> [B, T, D]: SoftmaxAttention's projections, local + k-means routed heads.

    Config (config.model): the softmax fields, plus CONFIG_DEFAULTS (a config without them gets
    these values)."""

    OPTION_PREFIX = "routing"
    CONFIG_DEFAULTS = {
        "routing_num_clusters": 4,       # C (paper: ~sqrt(T))
        "routing_cluster_size": 0,       # w tokens per cluster; 0: ceil(T / C)
        "routing_membership": "topw",    # "topw" (paper, balanced) or "causal" (see module doc)
        "routing_local_heads": -1,       # heads with local attention; -1: num_heads // 2
        "routing_local_window": 128,     # the local heads' causal window (tokens)
        "routing_ema_decay": 0.999,      # centroid EMA decay lambda
        "routing_commitment": 1e-4,      # commitment loss weight beta
        "routing_impl": "auto",          # block_sparse_attention impl
    }
    OPTION_RULES = {"routing_num_clusters": ">= 1", "routing_cluster_size": ">= 0",
                    "routing_membership": ("topw", "causal"),
                    "routing_local_heads": "== -1 or >= 0", "routing_local_window": ">= 1",
                    "routing_ema_decay": "[0, 1]", "routing_commitment": ">= 0",
                    "routing_impl": IMPLS}

    @staticmethod
    def validate_options(opt, cfg):
        local = opt["routing_local_heads"]
        if local != -1 and local > cfg.num_heads:
            raise ValueError(f"config.model.routing_local_heads={local} must be in "
                             f"[0, model.num_heads={cfg.num_heads}] (or -1: half the heads)")

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        set_options(self, cfg, "routing")  # self.num_clusters = routing_num_clusters, ...
        if self.local_heads < 0:
            self.local_heads = self.num_heads // 2
        self.routed_heads = self.num_heads - self.local_heads
        # drawn after the projections: q/k/v/o initialise exactly as SoftmaxAttention's
        self.centroids = Centroids(jax.random.normal(
            rngs.params(), (self.routed_heads, self.num_clusters, self.head_dim), jnp.float32))
        self.deterministic = False  # True (model.eval() / nnx.view): no centroid update

    def cluster_size_for(self, T: int) -> int:
        return min(self.cluster_size or math.ceil(T / self.num_clusters), T)

    def explain_extras(self, x, *, positions, q, k, mode: str) -> dict:
        """attention.explain's extras: "clusters" bool [B, R, C, T], the tokens each centroid
        holds for each routed head (the local heads come first and have none)."""
        B, T = q.shape[:2]
        rep = self.num_heads // k.shape[2]
        L = self.local_heads
        qr, kr = q[:, :, L:], jnp.repeat(k, rep, axis=2)[:, :, L:]
        w = self.cluster_size_for(T)
        idx, valid = cluster_slots(qr, kr, self.centroids[...], cluster_size=w,
                                   membership=self.membership)
        C = self.num_clusters
        hit = (idx.reshape(B, -1, C, w)[..., None] == jnp.arange(T)) & valid.reshape(
            B, -1, C, w)[..., None]
        return {"clusters": jnp.any(hit, axis=3)}

    def attend(self, q, k, v, *, mode: str):
        B, T, H, hd = q.shape
        rep = H // k.shape[2]
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)  # GQA: kv per query head
        L = self.local_heads
        ys = []
        if L:
            b = min(_LOCAL_BLOCK, T)
            n = math.ceil(T / b)
            mask = BlockMask.from_dense(local_blocks(n, n, b, b, self.local_window), b, b,
                                        q_len=T, k_len=T)
            ys.append(block_sparse_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], mask,
                                             causal=True, impl=self.impl,
                                             caller="Routing (local heads)"))
        if self.routed_heads:
            qr, kr, vr = q[:, :, L:], k[:, :, L:], v[:, :, L:]
            mu = self.centroids[...]
            ys.append(routed_attention(qr, kr, vr, mu, cluster_size=self.cluster_size_for(T),
                                       membership=self.membership, impl=self.impl))
            qn, kn = layer_norm(qr), layer_norm(kr)
            new_mu, (aq, ak) = ema_centroids(jax.lax.stop_gradient(mu),
                                             [jax.lax.stop_gradient(qn),
                                              jax.lax.stop_gradient(kn)], self.ema_decay)
            # commitment loss beta |x - sg(mu(x))|^2 (Roy et al. 2021, Sec. 4)
            r = jnp.arange(self.routed_heads)
            near_q = jax.lax.stop_gradient(mu)[r, aq]        # [B, T, R, d]
            near_k = jax.lax.stop_gradient(mu)[r, ak]
            commit = jnp.mean(jnp.sum(jnp.square(qn - near_q), -1)
                              + jnp.sum(jnp.square(kn - near_k), -1))
            self.sow(nnx.Intermediate, "aux_loss", self.commitment * commit)
            if mode == "train" and not self.deterministic:
                if getattr(self.centroids, "_can_update", True):
                    self.centroids[...] = new_mu
                else:
                    _warn_frozen()
        return jnp.concatenate(ys, axis=2) if len(ys) > 1 else ys[0]
