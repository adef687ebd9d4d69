"""DETR's set prediction loss: box ops, the matching cost, Hungarian matching, the loss, and
post-processing (Carion et al. 2020; the focal-loss form of Deformable DETR, Zhu et al. 2021,
and Plain DETR, Lin et al. 2023, with its hybrid one-to-many matching, Jia et al. 2023).

Conventions (shared with the DETR data pipeline and model):
  targets  "labels" [B, M] int32 in 0..K-1, "boxes" [B, M, 4] normalised (cx, cy, w, h) relative to
           the padded canvas, "box_mask" [B, M] bool (True: a real object; False: padding);
  outputs  "logits" [B, Q, K'] (focal: K' = K sigmoid logits, no background; softmax: K' = K + 1,
           the last "no object"), "boxes" [B, Q, 4] normalised cxcywh, optionally "aux" (a list of
           {"logits", "boxes"} of earlier decoder layers), "enc" (two-stage proposals, matched
           class-agnostically) and "one_to_many" ({"logits", "boxes", "aux"} of a second query
           group, matched against the targets repeated k times).

Everything is jnp (jit- and grad-compatible) except the scipy matcher, which runs on the host
through `jax.pure_callback`; `matcher="optax"` keeps matching in the graph (TPU, multi-host).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

CLASS_LOSSES = ("focal", "softmax")
MATCHERS = ("scipy", "optax")
# guards the divisions of IoU / GIoU: zero-area boxes (w or h <= 0, from a collapsing
# prediction) give 0 / EPS instead of 0 / 0 (facebookresearch/detr #101, Plain-DETR #23)
EPS = 1e-7
# stands in for padded targets' boxes in the loss, so no garbage reaches the (masked) terms
# and their gradients
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# box ops ([..., 4]; xyxy = (x1, y1, x2, y2))

def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = (b[..., i] for i in range(4))
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_xyxy_to_cxcywh(b):
    x1, y1, x2, y2 = (b[..., i] for i in range(4))
    return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def box_area(b):
    """[..., 4] xyxy -> [...]; an inverted side (x2 < x1) counts as zero length."""
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def paired_generalized_box_iou(a, b):
    """GIoU of broadcast pairs: a, b [..., 4] xyxy -> [...] in [-1, 1].

    GIoU = IoU - |C \\ (A u B)| / |C|, C the smallest box enclosing A and B (Rezatofighi et al.
    2019). Degenerate boxes never raise or give NaN: sides are clamped at 0 and the divisions
    guarded by EPS (two coincident zero-area boxes score 0, not 1).
    """
    # |A n B|
    lo = jnp.maximum(a[..., :2], b[..., :2])
    hi = jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)
    # |A u B| = |A| + |B| - |A n B|
    union = box_area(a) + box_area(b) - inter
    iou = inter / jnp.maximum(union, EPS)
    # |C|
    c_lo = jnp.minimum(a[..., :2], b[..., :2])
    c_hi = jnp.maximum(a[..., 2:], b[..., 2:])
    enclosing = jnp.prod(jnp.maximum(c_hi - c_lo, 0.0), axis=-1)
    # IoU - (|C| - |A u B|) / |C|
    return iou - (enclosing - union) / jnp.maximum(enclosing, EPS)


def generalized_box_iou(a, b):
    """All pairs: a [N, 4], b [M, 4] xyxy -> [N, M] (batched: jax.vmap over a leading axis)."""
    return paired_generalized_box_iou(a[:, None, :], b[None, :, :])


# ---------------------------------------------------------------------------------------------
# matching

def _check(class_loss=None, matcher=None):
    if class_loss is not None and class_loss not in CLASS_LOSSES:
        raise ValueError(f"class_loss must be one of {CLASS_LOSSES}, got {class_loss!r}")
    if matcher is not None and matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")


def match_cost(logits, pred_boxes, labels, boxes, *, class_loss: str = "focal",
               w_class: float = 2.0, w_l1: float = 5.0, w_giou: float = 2.0,
               alpha: float = 0.25, gamma: float = 2.0):
    """The matching cost of every (query, target) pair of one image.

    logits [Q, K'], pred_boxes [Q, 4] cxcywh, labels [M] int, boxes [M, 4] cxcywh -> [Q, M].
    Class cost: focal (Deformable / Plain DETR: the focal loss of calling the target class
    positive minus that of calling it negative) or -p(class) (DETR, softmax).
    """
    _check(class_loss=class_loss)
    logits = logits.astype(jnp.float32)
    labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
    if class_loss == "focal":
        p = jax.nn.sigmoid(logits)
        # pos = alpha (1 - p)^gamma (-log p), neg = (1 - alpha) p^gamma (-log(1 - p)), with
        # -log p = softplus(-x) and -log(1 - p) = softplus(x) (exact where p rounds to 0 or 1)
        pos = alpha * (1 - p) ** gamma * jax.nn.softplus(-logits)
        neg = (1 - alpha) * p ** gamma * jax.nn.softplus(logits)
        cost_class = jnp.take(pos - neg, labels, axis=1)
    else:
        # -p(c_i)
        cost_class = -jnp.take(jax.nn.softmax(logits, axis=-1), labels, axis=1)
    pred_boxes, boxes = pred_boxes.astype(jnp.float32), boxes.astype(jnp.float32)
    # ||b_i - b_hat||_1
    cost_l1 = jnp.abs(pred_boxes[:, None, :] - boxes[None, :, :]).sum(-1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(boxes))
    return w_class * cost_class + w_l1 * cost_l1 + w_giou * cost_giou


def _scipy_match_host(cost, box_mask):
    """Host side of the scipy matcher: any leading dims (batch, and vmap's when vmapped)."""
    cost, box_mask = np.asarray(cost, np.float64), np.asarray(box_mask, bool)
    Q, M = cost.shape[-2:]
    out = np.full(box_mask.shape, -1, np.int32)
    flat_out = out.reshape(-1, M)
    for c, m, o in zip(cost.reshape(-1, Q, M), box_mask.reshape(-1, M), flat_out):
        cols = np.flatnonzero(m)
        if cols.size == 0:
            continue
        # a NaN / inf cost (a diverged prediction) would make scipy raise; make it merely bad
        sub = np.nan_to_num(c[:, cols], nan=1e9, posinf=1e9, neginf=-1e9)
        rows, j = linear_sum_assignment(sub)
        o[cols[j]] = rows
    return flat_out.reshape(box_mask.shape)


def _optax_match_one(cost, box_mask):
    """[Q, M], [M] -> [M]. optax's Hungarian solves the full (possibly rectangular) problem,
    making min(Q, M) assignments, so padded columns get one constant cost `pad` above every
    valid cost. Q >= M: every column is assigned, and the pad columns add the same total to
    any assignment, so the valid columns' assignment is the optimal one. Q < M: pad > any valid
    cost makes swapping a pad column for an unassigned valid one always cheaper, so
    min(Q, M_valid) valid columns are assigned, optimally among assignments of that size."""
    valid = box_mask[None, :] & jnp.isfinite(cost)
    hi = jnp.max(jnp.where(valid, cost, -jnp.inf))
    hi = jnp.where(jnp.isfinite(hi), hi, 0.0)
    pad = hi + jnp.maximum(1.0, jnp.abs(hi))
    cost = jnp.where(jnp.isfinite(cost), cost, hi)
    cost = jnp.where(box_mask[None, :], cost, pad)
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    match = jnp.full(box_mask.shape, -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return jnp.where(box_mask, match, -1)


def hungarian_match(cost, box_mask, *, matcher: str = "scipy"):
    """Minimum-cost one-to-one matching of queries to the real targets of each image.

    cost [B, Q, M], box_mask [B, M] bool -> the query index of each target [B, M] int32, -1 for
    padded targets (and for real ones left over when Q < their number). No gradient flows.
    """
    _check(matcher=matcher)
    cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
    box_mask = box_mask.astype(bool)
    if matcher == "optax":
        return jax.vmap(_optax_match_one)(cost, box_mask)
    out = jax.ShapeDtypeStruct(box_mask.shape, jnp.int32)
    # broadcast_all: under an outer vmap the host function sees extra leading dims, which it
    # loops over like the batch
    return jax.pure_callback(_scipy_match_host, out, cost, box_mask, vmap_method="broadcast_all")


# ---------------------------------------------------------------------------------------------
# the set loss

def sigmoid_focal_loss(logits, targets, *, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise focal loss (Lin et al. 2017): logits, targets (0/1) [...] -> [...]."""
    p = jax.nn.sigmoid(logits)
    ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    # FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)
    return alpha_t * (1 - p_t) ** gamma * ce


def _layer_loss(logits, pred_boxes, labels, boxes, box_mask, num_boxes, *, class_loss, w_class,
                w_l1, w_giou, eos_coef, alpha, gamma, matcher):
    """Match one decoder layer's predictions to the targets and score the matched set.
    Returns (w_class L_class + w_l1 L_l1 + w_giou L_giou, the unweighted terms)."""
    logits = logits.astype(jnp.float32)
    pred_boxes = pred_boxes.astype(jnp.float32)
    _, Q, K = logits.shape
    cost_fn = functools.partial(match_cost, class_loss=class_loss, w_class=w_class, w_l1=w_l1,
                                w_giou=w_giou, alpha=alpha, gamma=gamma)
    cost = jax.vmap(cost_fn)(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(pred_boxes),
                             labels, boxes)
    idx = hungarian_match(cost, box_mask, matcher=matcher)  # [B, M]
    matched = idx >= 0
    # assign[b, q, m] = query q is matched to target m
    assign = (jnp.arange(Q)[None, :, None] == idx[:, None, :]) & matched[:, None, :]
    assign = assign.astype(jnp.float32)

    if class_loss == "focal":
        # one-hot targets of the matched queries; unmatched queries are all-negative
        onehot = jnp.einsum("bqm,bmk->bqk", assign, jax.nn.one_hot(labels, K))
        loss_class = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma).sum()
        loss_class = loss_class / num_boxes
    else:
        no_object = K - 1
        is_matched = assign.sum(-1) > 0
        target = jnp.where(is_matched, jnp.einsum("bqm,bm->bq", assign, labels.astype(jnp.float32)),
                           no_object).astype(jnp.int32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
        # the no-object class is down-weighted by eos_coef (it outnumbers the objects)
        weight = jnp.where(target == no_object, eos_coef, 1.0)
        loss_class = (weight * ce).sum() / weight.sum()

    src = jnp.take_along_axis(pred_boxes, jnp.maximum(idx, 0)[..., None], axis=1)  # [B, M, 4]
    # L1 = sum over matched pairs of ||b_i - b_hat_sigma(i)||_1 / num_boxes
    loss_l1 = jnp.where(matched[..., None], jnp.abs(src - boxes), 0.0).sum() / num_boxes
    # L_giou = sum over matched pairs of (1 - GIoU) / num_boxes
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(boxes))
    loss_giou = jnp.where(matched, 1.0 - giou, 0.0).sum() / num_boxes

    loss = w_class * loss_class + w_l1 * loss_l1 + w_giou * loss_giou
    terms = {"loss_class": loss_class, "loss_l1": loss_l1, "loss_giou": loss_giou,
             "num_matched": matched.sum().astype(jnp.float32)}
    return loss, terms


def _clean_targets(targets, k: int = 1):
    """Padded targets get label 0 and a harmless box; with k > 1 the targets are repeated k
    times along M (hybrid matching's one-to-many group)."""
    mask = targets["box_mask"].astype(bool)
    labels = jnp.where(mask, targets["labels"], 0).astype(jnp.int32)
    boxes = jnp.where(mask[..., None], targets["boxes"].astype(jnp.float32),
                      jnp.asarray(_DUMMY_BOX, jnp.float32))
    if k > 1:
        labels, boxes, mask = (jnp.tile(t, (1, k) + (1,) * (t.ndim - 2))
                               for t in (labels, boxes, mask))
    return labels, boxes, mask


def set_loss(outputs, targets, *, class_loss: str = "focal", w_class: float = 2.0,
             w_l1: float = 5.0, w_giou: float = 2.0, eos_coef: float = 0.1, alpha: float = 0.25,
             gamma: float = 2.0, matcher: str = "scipy", aux: bool = True,
             one_to_many_k: int = 0, one_to_many_weight: float = 1.0):
    """The Hungarian set loss of DETR, summed over decoder layers and query groups.

    outputs / targets: see the module docstring. Each layer (final, each "aux", "enc") is
    matched on its own; every term is normalised by the number of real target boxes (at least
    1) except the softmax class loss, a weighted mean over queries as in DETR. Hybrid matching:
    "one_to_many" is matched against the targets repeated `one_to_many_k` times and added with
    weight `one_to_many_weight`. Returns (loss, metrics): the final layer's unweighted
    loss_class / loss_l1 / loss_giou, num_boxes, num_matched, and the weighted total of each
    other layer (loss_aux{i}, loss_enc, loss_one_to_many).
    """
    _check(class_loss=class_loss, matcher=matcher)
    layer_loss = functools.partial(_layer_loss, class_loss=class_loss, w_class=w_class,
                                   w_l1=w_l1, w_giou=w_giou, eos_coef=eos_coef, alpha=alpha,
                                   gamma=gamma, matcher=matcher)
    labels, boxes, mask = _clean_targets(targets)
    num_boxes = jnp.maximum(mask.sum().astype(jnp.float32), 1.0)

    loss, terms = layer_loss(outputs["logits"], outputs["boxes"], labels, boxes, mask, num_boxes)
    metrics = dict(terms, num_boxes=num_boxes)
    if aux:
        for i, layer in enumerate(outputs.get("aux", ())):
            aux_loss, _ = layer_loss(layer["logits"], layer["boxes"], labels, boxes, mask,
                                     num_boxes)
            loss = loss + aux_loss
            metrics[f"loss_aux{i}"] = aux_loss
    if "enc" in outputs:
        # two-stage proposals are class-agnostic: every target counts as class 0
        enc_loss, _ = layer_loss(outputs["enc"]["logits"], outputs["enc"]["boxes"],
                                 jnp.zeros_like(labels), boxes, mask, num_boxes)
        loss = loss + enc_loss
        metrics["loss_enc"] = enc_loss
    if "one_to_many" in outputs:
        if one_to_many_k < 1:
            raise ValueError("outputs has a 'one_to_many' query group but one_to_many_k="
                             f"{one_to_many_k}: set k >= 1 (Plain DETR: 6)")
        group = outputs["one_to_many"]
        labels_k, boxes_k, mask_k = _clean_targets(targets, one_to_many_k)
        num_boxes_k = jnp.maximum(mask_k.sum().astype(jnp.float32), 1.0)
        layers = [group] + (list(group.get("aux", ())) if aux else [])
        o2m = sum(layer_loss(layer["logits"], layer["boxes"], labels_k, boxes_k, mask_k,
                             num_boxes_k)[0] for layer in layers)
        loss = loss + one_to_many_weight * o2m
        metrics["loss_one_to_many"] = o2m
    metrics["loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# post-processing

def postprocess(logits, boxes, *, top_k: int = 100, class_loss: str = "focal"):
    """Detections for evaluation: logits [B, Q, K'], boxes [B, Q, 4] cxcywh -> scores [B, k],
    labels [B, k] int32, boxes_xyxy [B, k, 4] normalised (scale by the canvas size for pixels),
    k = min(top_k, candidates), best first.

    focal: every (query, class) pair is a candidate scored sigmoid(logit), so one query may
    give several detections (Deformable / Plain DETR); softmax: each query's best real class
    (the no-object column is dropped), the top_k queries kept.
    """
    _check(class_loss=class_loss)
    logits = logits.astype(jnp.float32)
    B, Q, K = logits.shape
    xyxy = box_cxcywh_to_xyxy(boxes.astype(jnp.float32))
    if class_loss == "focal":
        prob = jax.nn.sigmoid(logits).reshape(B, Q * K)
        scores, flat = jax.lax.top_k(prob, min(top_k, Q * K))
        query, labels = flat // K, flat % K
    else:
        prob = jax.nn.softmax(logits, axis=-1)[..., :-1]
        best, best_label = prob.max(-1), prob.argmax(-1)
        scores, query = jax.lax.top_k(best, min(top_k, Q))
        labels = jnp.take_along_axis(best_label, query, axis=1)
    out_boxes = jnp.take_along_axis(xyxy, query[..., None], axis=1)
    return scores, labels.astype(jnp.int32), out_boxes
