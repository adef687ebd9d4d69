"""DETR's set loss: GIoU and the matching cost against plain numpy, both matchers reaching scipy's
optimum (square, Q > M, Q < M, padded targets that look cheapest), the whole loss against a
numpy reimplementation, invariance to permuting the queries, ~0 box loss for perfect
predictions, finite values and gradients with degenerate boxes, aux and one-to-many terms, and
post-processing."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from models.detr.loss import (MATCHERS, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh,
                              generalized_box_iou, hungarian_match, match_cost, postprocess,
                              set_loss)

ALPHA, GAMMA = 0.25, 2.0
# jitted: one compile per output structure is far cheaper than compiling every eager op
LOSS = jax.jit(set_loss, static_argnames=("class_loss", "matcher", "aux", "one_to_many_k"))


# ---------------------------------------------------------------------------------------------
# numpy references (float64, one pair / one image at a time)

def np_xyxy(b):
    b = np.asarray(b, np.float64)
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def np_giou_pair(a, b):
    """GIoU = IoU - |C \\ (A u B)| / |C|; an inverted or zero side is a zero-area box, and an
    empty union (or enclosing box) contributes 0 rather than 0 / 0."""
    def area(x1, y1, x2, y2):
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(*a) + area(*b) - inter
    iou = inter / union if union > 0 else 0.0
    c = area(min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
    return iou - (c - union) / c if c > 0 else iou


def np_giou(a, b):
    return np.array([[np_giou_pair(x, y) for y in np.asarray(b, np.float64)]
                     for x in np.asarray(a, np.float64)])


def np_sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_match_cost(logits, pred, labels, boxes, class_loss, wc=2.0, wl=5.0, wg=2.0):
    x = np.asarray(logits, np.float64)
    if class_loss == "focal":
        p = np_sigmoid(x)
        pos = ALPHA * (1 - p) ** GAMMA * -np.log(p)
        neg = (1 - ALPHA) * p ** GAMMA * -np.log(1 - p)
        cls = (pos - neg)[:, labels]
    else:
        cls = -np_softmax(x)[:, labels]
    pred, boxes = np.asarray(pred, np.float64), np.asarray(boxes, np.float64)
    l1 = np.abs(pred[:, None] - boxes[None]).sum(-1)
    return wc * cls + wl * l1 - wg * np_giou(np_xyxy(pred), np_xyxy(boxes))


def np_set_loss(logits, pred, labels, boxes, mask, class_loss, eos_coef=0.1):
    """DETR's loss of one decoder layer: scipy matching per image, focal loss / num_boxes or
    eos-weighted softmax CE, L1 and 1 - GIoU of matched pairs / num_boxes."""
    logits, pred = np.asarray(logits, np.float64), np.asarray(pred, np.float64)
    B, Q, K = logits.shape
    n = max(mask.sum(), 1)
    cls = l1 = giou = ce_num = ce_den = 0.0
    for b in range(B):
        valid = np.flatnonzero(mask[b])
        c = np_match_cost(logits[b], pred[b], labels[b, valid], boxes[b, valid], class_loss)
        rows, cols = linear_sum_assignment(c)
        tgt = valid[cols]
        for r, t in zip(rows, tgt):
            l1 += np.abs(pred[b, r] - boxes[b, t]).sum()
            giou += 1 - np_giou_pair(np_xyxy(pred[b, r]), np_xyxy(boxes[b, t]))
        if class_loss == "focal":
            y = np.zeros((Q, K))
            y[rows, labels[b, tgt]] = 1
            p = np_sigmoid(logits[b])
            p_t = np.where(y == 1, p, 1 - p)
            alpha_t = np.where(y == 1, ALPHA, 1 - ALPHA)
            cls += (alpha_t * (1 - p_t) ** GAMMA * -np.log(p_t)).sum()
        else:
            target = np.full(Q, K - 1)
            target[rows] = labels[b, tgt]
            logp = np.log(np_softmax(logits[b]))
            w = np.where(target == K - 1, eos_coef, 1.0)
            ce_num += (w * -logp[np.arange(Q), target]).sum()
            ce_den += w.sum()
    cls = cls / n if class_loss == "focal" else ce_num / ce_den
    return {"loss_class": cls, "loss_l1": l1 / n, "loss_giou": giou / n,
            "loss": 2 * cls + 5 * l1 / n + 2 * giou / n}


# ---------------------------------------------------------------------------------------------
# random problems

def random_boxes(rng, shape):
    centre = rng.uniform(0.2, 0.8, shape + (2,))
    size = rng.uniform(0.05, 0.4, shape + (2,))
    return np.concatenate([centre, size], -1).astype(np.float32)


def problem(seed, B=3, Q=7, M=4, K=3, class_loss="focal", aux=0):
    """outputs (with `aux` earlier layers) and targets; image 1 has no objects, image 2 some
    padding (whose labels / boxes are garbage the loss must ignore)."""
    rng = np.random.default_rng(seed)
    k_out = K if class_loss == "focal" else K + 1

    def layer():
        return {"logits": rng.normal(size=(B, Q, k_out)).astype(np.float32),
                "boxes": random_boxes(rng, (B, Q))}
    outputs = layer()
    if aux:
        outputs["aux"] = [layer() for _ in range(aux)]
    mask = np.ones((B, M), bool)
    mask[1] = False
    mask[2, M // 2:] = False
    labels = rng.integers(0, K, (B, M)).astype(np.int32)
    boxes = random_boxes(rng, (B, M))
    labels[~mask], boxes[~mask] = -7, np.nan  # padding: the loss never reads it
    return outputs, {"labels": labels, "boxes": boxes, "box_mask": mask}


# ---------------------------------------------------------------------------------------------
# box ops

def test_box_conversions_round_trip():
    b = random_boxes(np.random.default_rng(0), (5,))
    np.testing.assert_allclose(box_cxcywh_to_xyxy(b), np_xyxy(b), rtol=1e-6)
    np.testing.assert_allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b, rtol=1e-5, atol=1e-6)


# xyxy: disjoint, nested, identical, touching, zero width, zero area, inverted (x2 < x1)
SPECIAL = np.array([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [0.25, 0.25, 0.75, 0.5],
                    [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0], [0.5, 0.2, 0.5, 0.9],
                    [0.3, 0.3, 0.3, 0.3], [0.8, 0.1, 0.6, 0.4]], np.float32)


def test_giou_hand_computed_values():
    g = np.asarray(generalized_box_iou(SPECIAL, SPECIAL))
    assert g[0, 3] == pytest.approx(1.0)                  # identical
    assert g[0, 1] == pytest.approx(-1 / 3)               # disjoint: IoU 0, C = 3, union = 2
    assert g[2, 0] == pytest.approx(0.125)                # nested: IoU = 0.125, C = the outer box
    assert g[0, 4] == pytest.approx(0.0, abs=1e-6)        # touching: IoU 0, C = union


def test_giou_equals_numpy_reference_including_degenerate_boxes():
    rng = np.random.default_rng(1)
    boxes = np.concatenate([SPECIAL, np_xyxy(random_boxes(rng, (6,))).astype(np.float32)])
    got = np.asarray(generalized_box_iou(boxes, boxes[::-1]))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np_giou(boxes, boxes[::-1]), rtol=1e-5, atol=1e-6)
    batched = jax.vmap(generalized_box_iou)(jnp.stack([boxes] * 2), jnp.stack([boxes] * 2))
    np.testing.assert_allclose(batched[1], np_giou(boxes, boxes), rtol=1e-5, atol=1e-6)


def test_giou_gradient_is_finite_for_degenerate_boxes():
    # zero-size boxes, two coinciding points, inverted boxes: what a collapsing model predicts
    pts = jnp.array([[0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.4, 0.4],
                     [0.0, 0.0, 0.0, 1.0]])
    val, grad = jax.value_and_grad(lambda a: generalized_box_iou(a, pts).sum())(pts)
    assert np.isfinite(val) and np.isfinite(np.asarray(grad)).all()


# ---------------------------------------------------------------------------------------------
# matching

@pytest.mark.parametrize("class_loss", ["focal", "softmax"])
def test_match_cost_equals_numpy_reference(class_loss):
    outputs, targets = problem(2, class_loss=class_loss)
    valid = targets["box_mask"][0]
    args = (outputs["logits"][0], outputs["boxes"][0], targets["labels"][0][valid],
            targets["boxes"][0][valid])
    got = match_cost(*args, class_loss=class_loss)
    np.testing.assert_allclose(got, np_match_cost(*args, class_loss), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("Q,M", [(6, 6), (9, 4), (4, 7)])
def test_matcher_reaches_scipy_optimum_with_padded_targets(matcher, Q, M):
    rng = np.random.default_rng(10 * Q + M)
    B = 4
    mask = rng.random((B, M)) < 0.6
    mask[0], mask[1] = True, False  # all real (more than Q when Q < M); none real
    mask[2] = np.arange(M) < min(Q, M) - 1  # fewer targets than queries, with padding
    # padded columns are made the cheapest, and valid costs mostly positive: a matcher that let
    # padded columns compete (or priced them below the valid ones) would pick them
    cost = np.where(mask[:, None], rng.normal(2.0, 1.0, (B, Q, M)), -100.0).astype(np.float32)
    idx = np.asarray(jax.jit(functools.partial(hungarian_match, matcher=matcher))(cost, mask))
    assert idx.shape == (B, M) and idx.dtype == np.int32
    for b in range(B):
        valid = np.flatnonzero(mask[b])
        assert (idx[b][~mask[b]] == -1).all()
        got = idx[b][valid]
        hit = got >= 0
        assert hit.sum() == min(Q, valid.size)
        assert len(set(got[hit])) == hit.sum()  # one target per query
        rows, cols = linear_sum_assignment(cost[b][:, valid])
        np.testing.assert_allclose(cost[b][got[hit], valid[hit]].sum(),
                                   cost[b][rows, valid[cols]].sum(), rtol=1e-5, atol=1e-5)


def test_scipy_matcher_under_vmap():
    # e.g. decoder layers stacked on a leading axis: the host callback loops over it too
    rng = np.random.default_rng(3)
    cost = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    mask = rng.random((2, 3, 4)) < 0.7
    stacked = jax.vmap(hungarian_match)(cost, mask)
    for i in range(2):
        np.testing.assert_array_equal(stacked[i], hungarian_match(cost[i], mask[i]))


# ---------------------------------------------------------------------------------------------
# the set loss

@pytest.mark.parametrize("class_loss", ["focal", "softmax"])
def test_set_loss_equals_numpy_reference(class_loss):
    outputs, targets = problem(4, class_loss=class_loss)
    loss, metrics = LOSS(outputs, targets, class_loss=class_loss)
    want = np_set_loss(outputs["logits"], outputs["boxes"], targets["labels"], targets["boxes"],
                       targets["box_mask"], class_loss)
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(metrics["num_boxes"]) == targets["box_mask"].sum()


@pytest.mark.parametrize("matcher", MATCHERS)
def test_loss_is_invariant_to_permuting_queries(matcher):
    outputs, targets = problem(5, aux=2)
    rng = np.random.default_rng(6)

    def permuted(layer):
        perm = rng.permutation(layer["logits"].shape[1])  # its own order per layer
        return {"logits": layer["logits"][:, perm], "boxes": layer["boxes"][:, perm]}
    shuffled = dict(permuted(outputs), aux=[permuted(a) for a in outputs["aux"]])
    loss_fn = functools.partial(LOSS, matcher=matcher)
    loss, metrics = loss_fn(outputs, targets)
    loss_p, metrics_p = loss_fn(shuffled, targets)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
    for name in ("loss_class", "loss_l1", "loss_giou", "loss_aux0", "loss_aux1"):
        np.testing.assert_allclose(metrics_p[name], metrics[name], rtol=1e-5, err_msg=name)


def test_aux_losses_are_each_layer_matched_on_its_own():
    outputs, targets = problem(7, aux=2)
    total, metrics = LOSS(outputs, targets)
    layers = [outputs] + outputs["aux"]
    each = [LOSS({"logits": la["logits"], "boxes": la["boxes"]}, targets)[0] for la in layers]
    np.testing.assert_allclose(total, sum(each), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_aux1"], each[2], rtol=1e-5)
    np.testing.assert_allclose(LOSS(outputs, targets, aux=False)[0], each[0], rtol=1e-5)


@pytest.mark.parametrize("class_loss", ["focal", "softmax"])
def test_perfect_predictions_give_zero_box_loss_and_small_class_loss(class_loss):
    outputs, targets = problem(8, Q=9, class_loss=class_loss)
    mask, labels = targets["box_mask"], targets["labels"]
    logits = np.full_like(outputs["logits"], -10.0)
    if class_loss == "softmax":
        logits[..., -1] = 10.0  # confident "no object" for the unmatched queries
    boxes = outputs["boxes"].copy()
    rng = np.random.default_rng(9)
    for b in range(mask.shape[0]):
        for q, t in zip(rng.permutation(9), np.flatnonzero(mask[b])):
            boxes[b, q] = targets["boxes"][b, t]
            logits[b, q] = -10.0
            logits[b, q, labels[b, t]] = 10.0
    _, metrics = LOSS({"logits": logits, "boxes": boxes}, targets, class_loss=class_loss)
    assert float(metrics["num_matched"]) == mask.sum()
    assert float(metrics["loss_l1"]) < 1e-6
    assert float(metrics["loss_giou"]) < 1e-5
    assert float(metrics["loss_class"]) < 1e-3


@pytest.mark.parametrize("matcher", MATCHERS)
def test_loss_and_gradient_finite_with_degenerate_predicted_boxes(matcher):
    outputs, targets = problem(10, aux=1)
    boxes = outputs["boxes"]
    boxes[:, :3, 2:] = 0.0                    # zero width and height
    boxes[:, 3:5] = np.array([0.5, 0.5, 0.0, 0.0])  # coinciding points
    outputs["aux"][0]["boxes"][:] = boxes[:, :1]     # every query the same collapsed box
    loss, grads = jax.jit(jax.value_and_grad(
        lambda o: set_loss(o, targets, matcher=matcher)[0]))(outputs)
    assert np.isfinite(float(loss))
    for g in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(g)).all()


def test_one_to_many_group_matches_targets_repeated_k_times():
    k = 3
    outputs, targets = problem(11, Q=5)
    group, _ = problem(12, Q=4 * k)
    total, metrics = LOSS(dict(outputs, one_to_many=group), targets, one_to_many_k=k)
    repeated = {name: np.concatenate([t] * k, axis=1) for name, t in targets.items()}
    o2m, o2m_metrics = LOSS(group, repeated)
    np.testing.assert_allclose(total, LOSS(outputs, targets)[0] + o2m, rtol=1e-5)
    # every repeated target has its own query: one ground-truth box, k positives
    assert float(o2m_metrics["num_matched"]) == k * targets["box_mask"].sum()
    with pytest.raises(ValueError, match="one_to_many_k"):
        LOSS(dict(outputs, one_to_many=group), targets)


# ---------------------------------------------------------------------------------------------
# post-processing

@pytest.mark.parametrize("class_loss", ["focal", "softmax"])
def test_postprocess_equals_numpy_top_k(class_loss):
    outputs, _ = problem(13, Q=6, K=4, class_loss=class_loss)
    logits, boxes = outputs["logits"], outputs["boxes"]
    scores, labels, out_boxes = postprocess(logits, boxes, top_k=5, class_loss=class_loss)
    B, Q, _ = logits.shape
    if class_loss == "focal":  # every (query, class) pair competes
        prob = np_sigmoid(logits).reshape(B, -1)
        order = np.argsort(-prob, axis=1)[:, :5]
        query, want_labels = order // 4, order % 4
        want_scores = np.take_along_axis(prob, order, 1)
    else:  # each query's best real class; "no object" never reported
        prob = np_softmax(np.asarray(logits, np.float64))[..., :-1]
        query = np.argsort(-prob.max(-1), axis=1)[:, :5]
        want_labels = np.take_along_axis(prob.argmax(-1), query, 1)
        want_scores = np.take_along_axis(prob.max(-1), query, 1)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(out_boxes, np_xyxy(np.take_along_axis(boxes, query[..., None], 1)),
                               rtol=1e-5, atol=1e-6)
