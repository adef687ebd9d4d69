"""Routing attention (attention/routing.py): one cluster with w = T is causal softmax attention;
no output reads a later token; the centroid EMA matches its closed form; the commitment loss is
sown; the layer trains inside the LM."""
from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention
from attention.routing import RoutingAttention, routed_attention
from attention.softmax import SoftmaxAttention
from trainer.task import loss_with_aux


def _randn(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(**kw):
    base = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=0, num_layers=2,
                rope_theta=10000.0, routing_num_clusters=3, routing_local_heads=2,
                routing_local_window=8, routing_impl="xla")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _layer(cls, cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return cls(cfg, rngs=nnx.Rngs(seed))


def _positions(B, T):
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _ln(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def test_registered_and_loads_softmax_params():
    assert attention.get("routing") is RoutingAttention
    r, s = _layer(RoutingAttention, _cfg()), _layer(SoftmaxAttention, _cfg())
    # same projections (names, shapes, values from the same seed): a softmax checkpoint loads
    rp, sp = nnx.state(r, nnx.Param), nnx.state(s, nnx.Param)
    assert jax.tree.structure(rp) == jax.tree.structure(sp)
    for a, b in zip(jax.tree.leaves(rp), jax.tree.leaves(sp)):
        np.testing.assert_array_equal(a, b)
    assert r.centroids.shape == (2, 3, 8)  # [routed heads, clusters, head_dim], not a Param


@pytest.mark.parametrize("local_heads", [0, 2])
def test_one_cluster_with_w_equal_T_is_causal_softmax(local_heads):
    """C = 1, w = T (and a local window covering the sequence): exactly causal softmax."""
    B, T = 2, 21
    cfg = _cfg(routing_num_clusters=1, routing_local_heads=local_heads, routing_local_window=T)
    r, s = _layer(RoutingAttention, cfg), _layer(SoftmaxAttention, cfg)
    x = _randn((B, T, 32), 1)
    fwd = nnx.jit(lambda m, x: m(x, positions=_positions(B, T))[0])
    y_r, y_s = fwd(r, x), fwd(s, x)
    np.testing.assert_allclose(y_r, y_s, rtol=1e-5, atol=1e-6)


def test_never_reads_a_later_token():
    """d y_i / d x_j = 0 for j > i (the gather / top-w memberships carry no gradient, so this is
    exactly the attention pattern), and changing only later values leaves earlier outputs equal."""
    B, T, p = 1, 24, 13
    layer = _layer(RoutingAttention, _cfg())
    layer.deterministic = True
    x = _randn((B, T, 32), 2)
    graphdef, state = nnx.split(layer)

    def early(x_late):
        y, _ = nnx.merge(graphdef, state)(jnp.concatenate([x[:, :p], x_late], 1),
                                          positions=_positions(B, T))
        return y[:, :p]

    jac = jax.jit(jax.jacrev(early))(x[:, p:])
    assert np.all(np.asarray(jac) == 0.0)
    # the routed path alone: later values never reach earlier outputs (memberships fixed)
    q, k, v = (_randn((B, T, 2, 8), s) for s in (3, 4, 5))
    mu = _randn((2, 3, 8), 6)
    v2 = v.at[:, p:].set(_randn((B, T - p, 2, 8), 7))
    f = jax.jit(lambda v: routed_attention(q, k, v, mu, cluster_size=8, impl="xla"))
    y1, y2 = f(v), f(v2)
    np.testing.assert_array_equal(y1[:, :p], y2[:, :p])
    assert not np.allclose(y1[:, p:], y2[:, p:])


@pytest.mark.parametrize("membership", ["topw", "causal"])
def test_routed_matches_a_plain_per_cluster_loop(membership):
    """Against numpy. topw: each centroid takes its top-w tokens by (LN q + LN k) . mu; causal:
    each token joins its nearest centroid (|LN q - mu|^2 + |LN k - mu|^2), each cluster keeps its
    first w. Then causal softmax inside each cluster, mean over memberships, own value for
    tokens in no cluster."""
    B, T, R, d, C, w = 2, 12, 2, 4, 3, 3  # C * w < T: some tokens belong to no cluster
    q, k, v = (_randn((B, T, R, d), s) for s in (10, 11, 12))
    mu = _randn((R, C, d), 13)
    f = jax.jit(routed_attention, static_argnames=("cluster_size", "membership", "impl"))
    y = np.asarray(f(q, k, v, mu, cluster_size=w, membership=membership, impl="reference"))
    qn, kn, vv, m = _ln(q), _ln(k), np.asarray(v, np.float64), np.asarray(mu, np.float64)
    ref = np.zeros((B, T, R, d))
    for b in range(B):
        for h in range(R):
            acc, cnt = np.zeros((T, d)), np.zeros(T)
            dist = (((qn[b, :, h, None] - m[h]) ** 2).sum(-1)
                    + ((kn[b, :, h, None] - m[h]) ** 2).sum(-1))          # [T, C]
            for c in range(C):
                if membership == "topw":
                    members = np.sort(np.argsort(-((qn[b, :, h] + kn[b, :, h]) @ m[h, c]))[:w])
                else:
                    members = np.flatnonzero(dist.argmin(-1) == c)[:w]
                if not len(members):
                    continue
                n = len(members)
                qs, ks, vs = (np.asarray(a, np.float64)[b, members, h] for a in (q, k, v))
                s = qs @ ks.T / np.sqrt(d)
                s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                acc[members] += (p / p.sum(-1, keepdims=True)) @ vs
                cnt[members] += 1
            if membership == "causal":
                assert 0 < (cnt == 0).sum() < T  # the loop covers dropped tokens too
            ref[b, :, h] = np.where(cnt[:, None] > 0, acc / np.maximum(cnt, 1)[:, None],
                                    vv[b, :, h])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_causal_membership_later_tokens_never_change_earlier_outputs():
    """routing_membership="causal": perturbing x at positions >= p leaves outputs < p unchanged
    (the paper's balanced top-w membership does not guarantee this; see the module doc)."""
    B, T, p = 2, 24, 11
    layer = _layer(RoutingAttention, _cfg(routing_membership="causal", routing_cluster_size=6))
    layer.deterministic = True
    x = _randn((B, T, 32), 30)
    x2 = x.at[:, p:].set(_randn((B, T - p, 32), 31))
    fwd = nnx.jit(lambda m, x: m(x, positions=_positions(B, T))[0])
    y1, y2 = fwd(layer, x), fwd(layer, x2)
    np.testing.assert_array_equal(y1[:, :p], y2[:, :p])
    assert not np.allclose(y1[:, p:], y2[:, p:])


def test_ema_update_and_commitment_loss_match_closed_form():
    B, T, H, hd = 2, 16, 4, 8
    decay = 0.9  # a visible step (the default is 0.999)
    layer = _layer(RoutingAttention, _cfg(routing_ema_decay=decay))
    mu0 = np.asarray(layer.centroids[...], np.float64)
    q, k, v = _randn((B, T, H, hd), 20), _randn((B, T, 2, hd), 21), _randn((B, T, 2, hd), 22)
    attend = nnx.jit(lambda m, q, k, v, mode: nnx.capture(m.attend, nnx.Intermediate)(
        q, k, v, mode=mode), static_argnames="mode")
    _, inter = attend(layer, q, k, v, "train")
    # closed form over the routed heads (2, 3); their kv head is h // 2 = 1
    qn, kn = _ln(q[:, :, 2:]), _ln(np.repeat(np.asarray(k), 2, axis=2)[:, :, 2:])
    xs = np.concatenate([qn, kn], 1)                                  # [B, 2T, R, hd]
    assign = np.argmin(((xs[..., None, :] - mu0[None, None]) ** 2).sum(-1), -1)  # [B, 2T, R]
    want = mu0.copy()
    for h in range(2):
        for c in range(3):
            sel = xs[:, :, h][assign[:, :, h] == c]
            if len(sel):
                want[h, c] = decay * mu0[h, c] + (1 - decay) * sel.mean(0)
    assert not np.allclose(want, mu0)
    np.testing.assert_allclose(layer.centroids[...], want, rtol=1e-5, atol=1e-5)
    # commitment loss beta * mean |x - mu(x)|^2, q and k terms summed, with the old centroids
    near = np.take_along_axis(np.broadcast_to(mu0, (B, 2 * T) + mu0.shape),
                              assign[..., None, None], axis=3)[..., 0, :]
    dist = ((xs - near) ** 2).sum(-1)
    commit = 1e-4 * (dist[:, :T].mean() + dist[:, T:].mean())
    (aux,) = jax.tree.leaves(inter)
    np.testing.assert_allclose(aux, commit, rtol=1e-5)
    # no update at prefill or when deterministic
    after = np.asarray(layer.centroids[...])
    attend(layer, q, k, v, "prefill")
    layer.eval()
    attend(layer, q, k, v, "train")
    np.testing.assert_array_equal(layer.centroids[...], after)


def test_trains_in_the_lm():
    """Tiny LM with model.attention=routing: a jitted forward/backward gives finite, non-zero
    grads, the commitment loss reaches the task's metrics, and the centroids move."""
    from conftest import make_tiny_config
    from models.lm import LM, LMTask

    cfg = make_tiny_config("model.attention=routing")
    with nnx.use_eager_sharding(False):
        model = LM(cfg.model, rngs=nnx.Rngs(0))
    attn = model.blocks[0].attn
    assert isinstance(attn, RoutingAttention) and attn.local_heads == 2
    task = LMTask(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 33)), jnp.int32)
    mu0 = np.asarray(attn.centroids[...])

    @nnx.jit
    def step(model, tokens):
        return nnx.value_and_grad(lambda m: loss_with_aux(task, m, {"tokens": tokens}),
                                  has_aux=True)(model)

    (loss, metrics), grads = step(model, tokens)
    assert np.isfinite(loss) and float(metrics["aux_loss"]) > 0
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert float(jnp.abs(grads["blocks"][0]["attn"]["q_proj"]["kernel"][...]).max()) > 0
    assert not np.allclose(attn.centroids[...], mu0)  # EMA step through nnx transforms


@pytest.mark.slow
def test_trainer_steps_update_the_centroids(tmp_path):
    """Through trainer.Trainer: the train step threads the non-parameter state out of its
    differentiated loss, so the EMA update of the centroids reaches the train state."""
    from conftest import make_tiny_config
    from trainer import Trainer

    config = make_tiny_config("model.attention=routing", "train.steps=2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "centroids cannot be updated" warning
        with Trainer(config, str(tmp_path), quiet=True) as t:
            mu0 = np.array(t.model.blocks[0].attn.centroids[...])
            t.fit()
            mu1 = np.array(t.model.blocks[0].attn.centroids[...])
    assert np.all(np.isfinite(mu1)) and not np.allclose(mu0, mu1)
