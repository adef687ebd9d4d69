"""MixFormer's model (models/mixformer/model.py, attention/mixed.py): the asymmetric mixed attention
against a dense masked softmax in numpy, template tokens blind to the search (attention and
whole backbone) while the search sees every template, the cached-template tracking path equal
to the full forward, the corner head's soft-argmax and valid boxes, bilinear RoI features, the
box / score losses against hand values, and the score module's parameters and gradients."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from attention.mixed import MixedAttention
from conftest import jit_apply
from models import mixformer as mf

B = 2


@pytest.fixture(autouse=True)
def _logical_axes_without_mesh():
    with nnx.use_eager_sharding(False):  # parameters carry logical axes; no mesh here
        yield


def small_cfg(**fields):
    """Two layers, 2 templates of 2x2 patches, a 4x4 search grid."""
    base = dict(mf.MODEL_DEFAULTS, d_model=32, num_heads=4, num_layers=2, mlp_dim=64,
                patch_size=8, template_size=16, search_size=32, num_templates=2,
                corner_dim=16, score_hidden=32, score_pool=3)
    return ml_collections.ConfigDict({**base, **fields})


@pytest.fixture(scope="module")
def model():
    with nnx.use_eager_sharding(False):
        return mf.MixFormer(small_cfg(), rngs=nnx.Rngs(0))


def images(seed, *shape):
    return jax.random.normal(jax.random.key(seed), (B, *shape), jnp.float32)


def templates_and_search(seed=1):
    c = small_cfg()
    return (images(seed, c.num_templates, c.template_size, c.template_size, 3),
            images(seed + 1, c.search_size, c.search_size, 3))


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- mixed attention
def np_masked_mixed_attention(template, search, attn):
    """Softmax attention over concat(template, search) with the asymmetric mask (template
    queries: template keys only; search queries: all keys), dense, in float64 numpy."""
    w = {n: np.asarray(getattr(attn, n).kernel[...], np.float64)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    x = np.concatenate([np.asarray(template, np.float64), np.asarray(search, np.float64)], 1)
    Bx, N, _ = x.shape
    Nt, H, hd = template.shape[1], attn.num_heads, attn.head_dim
    q, k, v = ((x @ w[n]).reshape(Bx, N, H, hd) for n in ("q_proj", "k_proj", "v_proj"))
    allowed = np.ones((N, N), bool)
    allowed[:Nt, Nt:] = False
    scores = np.where(allowed, np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd), -np.inf)
    y = np.einsum("bhts,bshd->bthd", np_softmax(scores), v).reshape(Bx, N, H * hd) @ w["o_proj"]
    return y[:, :Nt], y[:, Nt:]


def test_mixed_attention_equals_dense_masked_softmax():
    attn = MixedAttention(24, 3, rngs=nnx.Rngs(0), out_std=0.2)
    template, search = images(1, 6, 24), images(2, 5, 24)  # odd Nt, Ns
    t_out, s_out = attn(template, search)
    t_ref, s_ref = np_masked_mixed_attention(template, search, attn)
    np.testing.assert_allclose(t_out, t_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_out, s_ref, rtol=1e-5, atol=1e-6)
    # the cached path: template K/V once, then the search alone
    np.testing.assert_allclose(attn.search_with_cache(search, *attn.template_kv(template)),
                               s_ref, rtol=1e-5, atol=1e-6)


def test_mixed_attention_template_blind_to_search_search_sees_template():
    attn = MixedAttention(32, 4, rngs=nnx.Rngs(0), out_std=0.2)
    template, search = images(1, 8, 32), images(2, 16, 32)
    t_out, s_out = attn(template, search)
    t_out2, _ = attn(template, search + images(3, 16, 32))
    np.testing.assert_array_equal(t_out2, t_out)  # bit-identical
    _, s_out3 = attn(template.at[:, -1].add(1.0), search)  # only the last template token
    assert float(jnp.max(jnp.abs(s_out3 - s_out))) > 1e-4


# ----------------------------------------------------------------------------- backbone
def test_backbone_template_tokens_blind_to_search(model):
    templates, search = templates_and_search()
    graphdef, state = nnx.split(model.backbone)
    fwd = jax.jit(lambda state, t, s: nnx.merge(graphdef, state)(t, s))
    t_tokens, s_tokens = fwd(state, templates, search)
    t_tokens2, _ = fwd(state, templates, templates_and_search(seed=7)[1])
    np.testing.assert_array_equal(t_tokens2, t_tokens)  # every layer, bit-identical
    # the search reads every template, the online one (slot 1) included
    _, s_tokens3 = fwd(state, templates.at[:, 1].multiply(-1.0), search)
    assert float(jnp.max(jnp.abs(s_tokens3 - s_tokens))) > 1e-3


def test_cached_templates_equal_full_forward(model):
    templates, search = templates_and_search()
    full, tracked = jit_apply(model, lambda m, t, s: (m(t, s), m.track(m.encode_templates(t), s)),
                              templates, search)
    cache = jit_apply(model, lambda m, t: m.encode_templates(t), templates)
    L, Nt = small_cfg().num_layers, small_cfg().num_templates * 4
    assert cache["k"].shape == cache["v"].shape == (L, B, Nt, 4, 8)
    assert cache["template_tokens"].shape == (B, Nt, 32)
    assert full["boxes"].shape == (B, 4) and full["score_logit"].shape == (B,)
    for key in ("boxes", "score_logit", "corner_logits"):
        np.testing.assert_allclose(tracked[key], full[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- heads
def test_soft_argmax_returns_the_peak_cell_centre():
    H, W = 5, 7
    for i, j in ((0, 0), (2, 5), (4, 6)):
        logits = jnp.full((1, H, W), -1e4).at[0, i, j].set(0.0)
        np.testing.assert_allclose(mf.soft_argmax(logits)[0], [(j + 0.5) / W, (i + 0.5) / H],
                                   atol=1e-6)
    # a flat map: the centre of the crop
    np.testing.assert_allclose(mf.soft_argmax(jnp.zeros((1, H, W)))[0], [0.5, 0.5], atol=1e-6)


def test_model_boxes_are_valid_even_when_the_corners_cross():
    m = mf.MixFormer(small_cfg(num_layers=1), rngs=nnx.Rngs(3))
    # peaky heat maps: the two independent soft-argmaxes land far apart and, for about half of
    # the examples, in the wrong order
    for branch in (m.box_head.top_left, m.box_head.bottom_right):
        branch.out.kernel[...] = branch.out.kernel[...] * 100.0
    templates = images(1, 2, 16, 16, 3).repeat(4, axis=0)
    search = jax.random.normal(jax.random.key(5), (4 * B, 32, 32, 3))
    out = jit_apply(m, lambda m, t, s: m(t, s), templates, search)
    boxes, logits = np.asarray(out["boxes"]), out["corner_logits"]
    tl, br = (np.asarray(mf.soft_argmax(logits[:, i])) for i in (0, 1))
    assert np.any(tl > br), "test set-up: no crossed corners"
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])
    np.testing.assert_allclose(boxes, np.concatenate([np.minimum(tl, br), np.maximum(tl, br)], 1),
                               atol=1e-6)


def test_roi_features_sample_bilinearly_inside_the_box():
    H, W, P = 6, 8, 3
    ys, xs = np.meshgrid((np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W, indexing="ij")
    fmap = jnp.asarray(np.stack([xs, ys], -1)[None].repeat(2, 0), jnp.float32)  # f = (x, y)
    boxes = jnp.array([[0.2, 0.3, 0.8, 0.7], [0.0, 0.0, 1.0, 1.0]])
    out = np.asarray(mf.roi_features(fmap, boxes, P))
    frac = (np.arange(P) + 0.5) / P
    for b, (x1, y1, x2, y2) in enumerate(np.asarray(boxes)):
        px, py = x1 + (x2 - x1) * frac, y1 + (y2 - y1) * frac
        gy, gx = np.meshgrid(py, px, indexing="ij")
        # a linear map is reproduced exactly inside the cell centres, clamped outside them
        expect = np.stack([np.clip(gx, 0.5 / W, 1 - 0.5 / W), np.clip(gy, 0.5 / H, 1 - 0.5 / H)],
                          -1).reshape(P * P, 2)
        np.testing.assert_allclose(out[b], expect, atol=1e-6)


# ----------------------------------------------------------------------------- losses
def test_box_loss_values_and_degenerate_gradients():
    boxes = jnp.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    loss, metrics = mf.box_loss(boxes, boxes)
    assert abs(float(loss)) < 1e-6 and abs(float(metrics["iou"]) - 1) < 1e-6
    # by hand: IoU = 1/16 / (7/16) = 1/7, |C| = 9/16, GIoU = 1/7 - (9/16 - 7/16) / (9/16),
    # L1 = mean |delta| = 0.25
    loss, metrics = mf.box_loss(jnp.array([[0.0, 0.0, 0.5, 0.5]]),
                                jnp.array([[0.25, 0.25, 0.75, 0.75]]))
    giou = 1 / 7 - 2 / 9
    np.testing.assert_allclose(float(loss), 2.0 * (1 - giou) + 5.0 * 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["iou"]), 1 / 7, rtol=1e-6)
    # degenerate predictions: a point, a line, a point on a point
    pred = jnp.array([[0.4, 0.4, 0.4, 0.4], [0.2, 0.5, 0.7, 0.5], [0.3, 0.3, 0.3, 0.3]])
    target = jnp.array([[0.1, 0.1, 0.6, 0.6], [0.2, 0.2, 0.7, 0.8], [0.3, 0.3, 0.3, 0.3]])
    grad = jax.grad(lambda p: mf.box_loss(p, target)[0])(pred)
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).sum()) > 0


def test_score_loss_is_bce_with_logits():
    logit, label = jnp.array([2.0, -1.0, 0.5, -30.0]), jnp.array([1, 0, 0, 1])
    p = 1 / (1 + np.exp(-np.asarray(logit, np.float64)))
    lab = np.asarray(label, np.float64)
    expect = -np.mean(lab * np.log(p) + (1 - lab) * np.log(1 - p))
    loss, metrics = mf.score_loss(logit, label)
    np.testing.assert_allclose(float(loss), expect, rtol=1e-6)
    assert float(metrics["score_accuracy"]) == 0.5


def test_score_labels_turn_missed_positives_into_negatives():
    label, iou = jnp.array([1, 1, 0, 1]), jnp.array([0.9, 0.3, 0.8, 0.5])
    np.testing.assert_array_equal(mf.score_labels(label, iou, 0.0), [1, 1, 0, 1])
    np.testing.assert_array_equal(mf.score_labels(label, iou, 0.5), [1, 0, 0, 1])


# ----------------------------------------------------------------------------- score module
def paths(state):
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


def test_score_parameters_train_alone_and_the_box_is_stop_gradient(model):
    # what the trainer's train.trainable="^score" selects (trainer/trainer.py Trainer.trainable)
    regex = re.compile("^score")
    selected = nnx.state(model, nnx.All(nnx.Param, lambda path, _: bool(
        regex.search("/".join(map(str, path))))))
    under_score = {f"score/{p}" for p in paths(nnx.state(model.score, nnx.Param))}
    assert paths(selected) == under_score and under_score

    templates, search = templates_and_search()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, key):
        out = nnx.merge(graphdef, p, rest)(templates, search)
        return out[key].sum() if key == "score_logit" else (out[key] * jnp.arange(1, 5)).sum()

    g_score, g_box = jax.jit(lambda p: (jax.grad(loss)(p, "score_logit"),
                                        jax.grad(loss)(p, "boxes")))(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(g_score["score"])[0]:
        assert float(jnp.abs(leaf).max()) > 0, f"score{jax.tree_util.keystr(path)}: no gradient"
    # the box reaches the score only through stop_gradient: no gradient into the box head ...
    for leaf in jax.tree.leaves(g_score["box_head"]):
        assert float(jnp.abs(leaf).max()) == 0.0
    # ... which is alive: the boxes themselves do send it gradients
    assert sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(g_box["box_head"])) > 0


def test_bad_sizes_name_the_field():
    with pytest.raises(ValueError, match="search_size"):
        mf.MixFormer(small_cfg(search_size=30), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_templates"):
        mf.MixFormer(small_cfg(), rngs=nnx.Rngs(0)).backbone.embed_templates(
            images(0, 3, 16, 16, 3))


def test_corner_upsample_gives_finer_heat_maps_and_valid_boxes():
    c = small_cfg(num_layers=1, corner_upsample=2)
    m = mf.MixFormer(c, rngs=nnx.Rngs(4))
    templates, search = templates_and_search(7)
    out = jit_apply(m, lambda m, t, s: m(t, s), templates, search)
    g = 2 * c.search_size // c.patch_size
    assert out["corner_logits"].shape == (B, 2, g, g)
    boxes = np.asarray(out["boxes"])
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, :2] <= boxes[:, 2:])
    # the boxes are the soft-argmaxes of the fine maps (cell centres (j + 0.5) / (u G))
    tl = np.asarray(mf.soft_argmax(out["corner_logits"][:, 0]))
    br = np.asarray(mf.soft_argmax(out["corner_logits"][:, 1]))
    np.testing.assert_allclose(boxes, np.concatenate([np.minimum(tl, br), np.maximum(tl, br)], 1),
                               atol=1e-6)
    # the cached-template path still equals the full forward
    cached = jit_apply(m, lambda m, t, s: m.track(m.encode_templates(t), s), templates, search)
    for key in ("boxes", "corner_logits", "score_logit"):
        np.testing.assert_allclose(np.asarray(cached[key]), np.asarray(out[key]), atol=1e-5)
    with pytest.raises(ValueError, match="corner_upsample"):
        mf.MixFormer(small_cfg(corner_upsample=0), rngs=nnx.Rngs(0))
