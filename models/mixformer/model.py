"""MixFormer: end-to-end tracking with iterative mixed attention (Cui et al., CVPR 2022;
MCG-NJU/MixFormer lib/models/mixformer_vit), the MixViT variant, with its score prediction
module, losses and its Task ("mixformer"; data: models/mixformer/tracking.py; the online tracker:
models/mixformer/track.py).

    templates [B, n, T, T, 3], search [B, S, S, 3]
      --p x p patches, one shared linear embedding, + template / search learned positions
        (the n templates share the template grid's) + a token-type embedding-->
      template tokens [B, Nt = n (T/p)^2, D], search tokens [B, Ns = (S/p)^2, D]
      --L pre-norm blocks: (t, s) + MixedAttention(LN(t), LN(s)), then each + MLP(LN(.))
        (attention/mixed.py: template queries see template keys only; search queries see all)
        --> final LN
      box head on the search map [B, S/p, S/p, D]: corner head -> boxes [B, 4] xyxy in [0, 1]
      score head (`score`): a learned token cross-attending to RoI features of the predicted
        box (stop-gradient'ed) and to the initial template's tokens -> MLP -> score_logit [B]

Box head: the CORNER head (the reference's `Corner_Predictor`). The reference's CORNER_UP variant
upsamples the map to stride 4 with transposed convs; here `corner_upsample` resizes it
bilinearly after each branch's first conv (2: the heat maps at stride p / 2). Two conv stacks
give top-left and bottom-right heat maps over the (upsampled) search grid, and a soft-argmax
(the probability-weighted mean of the cell centres, (j + 0.5) / G; the reference's j / G, the
cells' top-left corners, is shifted half a cell) turns each into a normalised point. The two
corners are ordered (x1 = min, x2 = max) so the output is always a valid box, what the GIoU
loss and the RoI sampler assume; early in training the independent heat maps can cross. BatchNorm of the reference's convs is GroupNorm here: no batch
statistics or train/eval mode for the generic trainer to thread through. Positions are learned
(the reference uses fixed 2D sin-cos tables under its pretrained ViT).

Score head: the reference's ScoreDecoder with PrRoIPool replaced by bilinear sampling of a
score_pool x score_pool grid of cell-centred points inside the box (`roi_features`). All its
parameters live under the top-level attribute `score`, so stage 2 trains only them with
`train.trainable="^score"`; the box enters it through stop_gradient (the score must judge the
box, not move it).

Inference (the reference's set_online / forward_test): `encode_templates(templates) -> cache`
(every layer's template keys and values, and the final template tokens) once per template
update, then `track(cache, search)` per frame, equal to `model(templates, search)`.

Losses: `box_loss` = 2 GIoU loss + 5 L1 on normalised xyxy (the paper's; the released code
uses CIoU in place of GIoU: lib/utils/box_ops.py), `score_loss` = BCE with logits on a 0/1 label.

config.model fields (MODEL_DEFAULTS: values that run on a laptop, for configs/mixformer.py to
start from; MixViT-B in brackets):
  d_model        token width D [768]
  num_heads      attention heads, D % num_heads == 0 [12]; the score head's cross-attention too
  num_layers     mixed-attention blocks L [12]
  mlp_dim        MLP hidden width [3072]
  patch_size     p: template_size and search_size are multiples of it [16]
  template_size  T, template crop side in pixels [128]
  search_size    S, search crop side in pixels [288]
  num_templates  n templates per example: the initial one, then online ones [2]
  corner_dim     first conv width of each corner branch (then /2, /4); a multiple of 4 [384]
  corner_upsample  u: the corner branches upsample their map u x (bilinear) after the first
                 conv, so the heat maps are u S/p cells a side [1]; 2 on the tiny crops, where a
                 target spans 2 patches of the search grid (MixViT-B: 288/4.5/16 = 4)
  score_hidden   hidden width of the score MLP [768]
  score_pool     RoI grid side of the score head's box features [4]
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attention.layers import Mlp, compute_dtype, layer_norm, linear, param
from attention.mixed import MixedAttention
from attention.sharding import constrain
from models.detr.loss import EPS, box_area, paired_generalized_box_iou
from models.vit import patchify
from models.mixformer import tracking
from trainer.config import ConfigError
from trainer.data import embedded_dir
from trainer.task import Task, register_task


MODEL_DEFAULTS = dict(d_model=64, num_heads=4, num_layers=4, mlp_dim=256, patch_size=8,
                      template_size=32, search_size=64, num_templates=2, corner_dim=64,
                      corner_upsample=2, score_hidden=64, score_pool=4)
# the paper's box loss weights (experiments/mixformer_vit/baseline.yaml IOU_WEIGHT, L1_WEIGHT)
GIOU_WEIGHT, L1_WEIGHT = 2.0, 5.0

_TOKENS = ("batch", "length", "act_embed")


def check_model_config(cfg) -> None:
    """ValueError naming the config.model field when the sizes do not fit together."""
    p = cfg.patch_size
    for name in ("template_size", "search_size"):
        if p < 1 or getattr(cfg, name) % p:
            raise ValueError(f"config.model.{name}={getattr(cfg, name)} is not a multiple of "
                             f"config.model.patch_size={p}")
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"config.model.d_model={cfg.d_model} is not divisible by "
                         f"config.model.num_heads={cfg.num_heads}")
    for name, lo in (("num_templates", 1), ("num_layers", 1), ("score_pool", 1),
                     ("corner_dim", 4), ("corner_upsample", 1)):
        if getattr(cfg, name) < lo:
            raise ValueError(f"config.model.{name} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.corner_dim % 4:
        raise ValueError(f"config.model.corner_dim={cfg.corner_dim} must be a multiple of 4 "
                         "(the corner branches halve it twice)")


# ----------------------------------------------------------------------------- backbone
class MixedBlock(nnx.Module):
    """(t, s) <- (t, s) + MixedAttention(LN(t), LN(s)); then t <- t + MLP(LN(t)), s likewise.
    LN and MLP act per token, so the two streams share them exactly as the reference's block
    over the concatenation. t [B, Nt, D], s [B, Ns, D]."""

    def __init__(self, cfg, *, dtype, rngs):
        d = cfg.d_model
        self.attn_norm = layer_norm(d, dtype=dtype, rngs=rngs)
        self.attn = MixedAttention(d, cfg.num_heads, dtype=dtype, rngs=rngs,
                                   out_std=0.02 / math.sqrt(2 * cfg.num_layers))
        self.mlp_norm = layer_norm(d, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(d, cfg.mlp_dim, dtype=dtype, rngs=rngs)

    def _mlp(self, x):
        return constrain(x + self.mlp(self.mlp_norm(x)), _TOKENS)

    def encode_template(self, t):
        """t [B, Nt, D] -> (next t, (K_t, V_t) [B, Nt, H, d_h] of this layer)."""
        h, kv = self.attn.encode_template(self.attn_norm(t))
        return self._mlp(constrain(t + h, _TOKENS)), kv

    def track(self, s, k_t, v_t):
        """s [B, Ns, D] and this layer's cached K_t, V_t -> next s."""
        h = self.attn.search_with_cache(self.attn_norm(s), k_t, v_t)
        return self._mlp(constrain(s + h, _TOKENS))

    def __call__(self, t, s):
        t_next, (k_t, v_t) = self.encode_template(t)
        return t_next, self.track(s, k_t, v_t)


class MixViT(nnx.Module):
    """The mixed-attention backbone: templates [B, n, T, T, 3], search [B, S, S, 3] ->
    (template tokens [B, n (T/p)^2, D], search tokens [B, (S/p)^2, D]), after the final LN."""

    def __init__(self, cfg, *, dtype, rngs):
        d, p = cfg.d_model, cfg.patch_size
        self.patch_size, self.num_templates = p, cfg.num_templates
        self.template_size, self.search_size = cfg.template_size, cfg.search_size
        normal = nnx.initializers.normal(0.02)
        self.patch_embed = linear(p * p * 3, d, (None, "embed"), dtype=dtype, rngs=rngs, std=None)
        self.template_pos = param(rngs, normal, ((cfg.template_size // p) ** 2, d),
                                  (None, "embed"))
        self.search_pos = param(rngs, normal, ((cfg.search_size // p) ** 2, d), (None, "embed"))
        # row 0: template token, row 1: search token
        self.type_embed = param(rngs, normal, (2, d), (None, "embed"))
        self.blocks = nnx.List([MixedBlock(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_norm = layer_norm(d, dtype=dtype, rngs=rngs)

    def embed_templates(self, templates):
        """[B, n, T, T, 3] -> [B, n (T/p)^2, D]; every template gets the same grid positions."""
        B, n, T = templates.shape[:3]
        if templates.shape[1:] != (self.num_templates, self.template_size, self.template_size, 3):
            raise ValueError(f"templates must be [B, {self.num_templates}, {self.template_size}, "
                             f"{self.template_size}, 3] (config.model.num_templates, "
                             f"template_size), got {templates.shape}")
        x = self.patch_embed(patchify(templates.reshape(B * n, T, T, 3), self.patch_size))
        x = x + (self.template_pos[...] + self.type_embed[0]).astype(x.dtype)
        return constrain(x.reshape(B, -1, x.shape[-1]), _TOKENS)

    def embed_search(self, search):
        """[B, S, S, 3] -> [B, (S/p)^2, D]."""
        if search.shape[1:] != (self.search_size, self.search_size, 3):
            raise ValueError(f"search must be [B, {self.search_size}, {self.search_size}, 3] "
                             f"(config.model.search_size), got {search.shape}")
        x = self.patch_embed(patchify(search, self.patch_size))
        return constrain(x + (self.search_pos[...] + self.type_embed[1]).astype(x.dtype), _TOKENS)

    def encode_templates(self, templates):
        """-> (template tokens [B, Nt, D], K, V [L, B, Nt, H, d_h]): the search-free half."""
        t, ks, vs = self.embed_templates(templates), [], []
        for block in self.blocks:
            t, (k, v) = block.encode_template(t)
            ks.append(k)
            vs.append(v)
        return self.final_norm(t), jnp.stack(ks), jnp.stack(vs)

    def track(self, k, v, search):
        """Cached K, V [L, B, Nt, H, d_h], search [B, S, S, 3] -> search tokens [B, Ns, D]."""
        s = self.embed_search(search)
        for i, block in enumerate(self.blocks):
            s = block.track(s, k[i], v[i])
        return self.final_norm(s)

    def __call__(self, templates, search):
        t, s = self.embed_templates(templates), self.embed_search(search)
        for block in self.blocks:
            t, s = block(t, s)
        return self.final_norm(t), self.final_norm(s)


# ----------------------------------------------------------------------------- box head
def soft_argmax(logits):
    """Heat-map logits [B, H, W] -> expected point [B, 2] (x, y) normalised to [0, 1]:
    E_p[centre of cell] with p = softmax over the H W cells, cell (i, j)'s centre at
    ((j + 0.5) / W, (i + 0.5) / H). Float32."""
    B, H, W = logits.shape
    prob = jax.nn.softmax(logits.reshape(B, H * W).astype(jnp.float32), axis=-1)
    prob = prob.reshape(B, H, W)
    # x = sum_ij p_ij (j + 0.5) / W,  y = sum_ij p_ij (i + 0.5) / H
    x = jnp.einsum("bhw,w->b", prob, (jnp.arange(W) + 0.5) / W)
    y = jnp.einsum("bhw,h->b", prob, (jnp.arange(H) + 0.5) / H)
    return jnp.stack([x, y], axis=-1)


class CornerBranch(nnx.Module):
    """[B, G, G, D] -> one corner's heat-map logits [B, u G, u G]: 3x3 conv-GroupNorm-ReLU at
    widths C, C/2, C/4, then a 1x1 conv to one channel; with upsample u > 1 the map is resized
    u x (bilinear) after the first block, so the later convs place the corner on a finer grid."""

    def __init__(self, d: int, channels: int, *, upsample: int = 1, dtype, rngs):
        self.upsample = upsample
        widths = (d, channels, channels // 2, channels // 4)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", dtype=dtype,
                                        param_dtype=jnp.float32, rngs=rngs)
                               for a, b in zip(widths[:-1], widths[1:])])
        self.norms = nnx.List([nnx.GroupNorm(c, num_groups=math.gcd(8, c), dtype=dtype,
                                             param_dtype=jnp.float32, rngs=rngs)
                               for c in widths[1:]])
        self.out = nnx.Conv(widths[-1], 1, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                            rngs=rngs)

    def __call__(self, x):
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = jax.nn.relu(norm(conv(x)))
            if i == 0 and self.upsample > 1:
                B, H, W, C = x.shape
                x = jax.image.resize(x, (B, H * self.upsample, W * self.upsample, C), "bilinear")
        return self.out(x)[..., 0]


class CornerHead(nnx.Module):
    """Search map [B, G, G, D] -> (boxes [B, 4] xyxy in [0, 1] with x1 <= x2, y1 <= y2,
    corner logits [B, 2, u G, u G] (top-left, bottom-right)), float32."""

    def __init__(self, d: int, channels: int, *, upsample: int = 1, dtype, rngs):
        self.top_left = CornerBranch(d, channels, upsample=upsample, dtype=dtype, rngs=rngs)
        self.bottom_right = CornerBranch(d, channels, upsample=upsample, dtype=dtype, rngs=rngs)

    def __call__(self, feature_map):
        logits = jnp.stack([self.top_left(feature_map), self.bottom_right(feature_map)], axis=1)
        logits = logits.astype(jnp.float32)
        tl, br = soft_argmax(logits[:, 0]), soft_argmax(logits[:, 1])
        # crossed heat maps still give a valid box; the gradient reaches whichever is the left
        boxes = jnp.concatenate([jnp.minimum(tl, br), jnp.maximum(tl, br)], axis=-1)
        return boxes, logits


# ----------------------------------------------------------------------------- score head
def roi_features(feature_map, boxes, pool: int):
    """Bilinear RoI sampling (in place of the reference's PrRoIPool): feature_map
    [B, H, W, D], boxes [B, 4] xyxy normalised -> [B, pool * pool, D], the map at the centres
    of a pool x pool grid of equal cells inside each box (row-major), cell (i, j) of the map
    centred at ((j + 0.5) / W, (i + 0.5) / H), clamped to the border cells outside."""
    B, H, W, D = feature_map.shape
    frac = (jnp.arange(pool, dtype=jnp.float32) + 0.5) / pool
    boxes = boxes.astype(jnp.float32)
    xs = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * frac  # [B, pool]
    ys = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * frac

    def taps(coord, n):
        """Normalised coordinates -> the two neighbouring cells and the far one's weight."""
        f = jnp.clip(coord * n - 0.5, 0.0, n - 1.0)
        lo = jnp.floor(f).astype(jnp.int32)
        return lo, jnp.minimum(lo + 1, n - 1), (f - lo).astype(feature_map.dtype)

    x0, x1, wx = taps(xs, W)
    y0, y1, wy = taps(ys, H)
    rows = jax.vmap(lambda f, iy: f[iy])  # [B, H, W, D], [B, pool] -> [B, pool, W, D]
    cols = jax.vmap(lambda f, ix: f[:, ix])  # [B, pool, W, D], [B, pool] -> [B, pool, pool, D]
    wx, wy = wx[:, None, :, None], wy[:, :, None, None]

    def along_x(r):
        return cols(r, x0) * (1 - wx) + cols(r, x1) * wx

    # f(y, x) = (1 - wy) [(1 - wx) f00 + wx f01] + wy [(1 - wx) f10 + wx f11]
    out = along_x(rows(feature_map, y0)) * (1 - wy) + along_x(rows(feature_map, y1)) * wy
    return out.reshape(B, pool * pool, D)


class ScoreCrossAttention(nnx.Module):
    """One stage of the score decoder: the token x [B, 1, D] attends to memory [B, M, D];
    as in the reference, the stage's output LN(W_o attn) replaces the token (no residual)."""

    def __init__(self, d: int, num_heads: int, *, dtype, rngs):
        self.num_heads = num_heads
        self.q_proj = linear(d, d, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o_proj = linear(d, d, ("heads", "embed"), dtype=dtype, rngs=rngs)
        self.norm = layer_norm(d, dtype=dtype, rngs=rngs)

    def __call__(self, x, memory):
        def heads(y):
            return y.reshape(*y.shape[:2], self.num_heads, -1)

        # softmax(q k^T / sqrt(d_h)) v, one query
        o = jax.nn.dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(memory)),
                                         heads(self.v_proj(memory)))
        return self.norm(self.o_proj(o.reshape(x.shape)))


class ScorePredictionModule(nnx.Module):
    """MixFormer's score prediction module (SPM; reference lib/models/mixformer_vit/
    score_decoder.py). search map [B, G, G, D], template tokens [B, Nt1, D], boxes [B, 4]
    xyxy normalised -> score_logit [B] float32: how reliable the box is, deciding online
    template updates. The box is a stop_gradient input."""

    def __init__(self, d: int, num_heads: int, hidden: int, pool: int, *, dtype, rngs):
        self.pool = pool
        self.score_token = param(rngs, nnx.initializers.normal(0.02), (1, d), (None, "embed"))
        self.token_norm = layer_norm(d, dtype=dtype, rngs=rngs)
        self.box_attn = ScoreCrossAttention(d, num_heads, dtype=dtype, rngs=rngs)
        self.template_attn = ScoreCrossAttention(d, num_heads, dtype=dtype, rngs=rngs)
        self.mlp = nnx.List([linear(a, b, (None, None), dtype=dtype, rngs=rngs, std=None)
                             for a, b in ((d, hidden), (hidden, hidden), (hidden, 1))])

    def __call__(self, search_map, template_tokens, boxes):
        B, dtype = search_map.shape[0], search_map.dtype
        box_feat = roi_features(search_map, jax.lax.stop_gradient(boxes), self.pool)
        x = self.token_norm(jnp.broadcast_to(self.score_token[...].astype(dtype),
                                             (B, 1, search_map.shape[-1])))
        # first the predicted box's features, then the template's
        x = self.template_attn(self.box_attn(x, box_feat), template_tokens)
        for i, layer in enumerate(self.mlp):
            x = layer(x) if i == len(self.mlp) - 1 else jax.nn.relu(layer(x))
        return x[:, 0, 0].astype(jnp.float32)


# ----------------------------------------------------------------------------- model
class MixFormer(nnx.Module):
    """cfg: config.model (module docstring). Top-level parts: `backbone` (MixViT), `box_head`
    (corner head), `score` (score prediction module; train.trainable="^score" selects it).

    model(templates [B, n, T, T, 3], search [B, S, S, 3]) -> dict
        boxes          [B, 4]  xyxy normalised to the search crop, float32
        corner_logits  [B, 2, u S/p, u S/p]  top-left / bottom-right heat-map logits, float32
                       (u = corner_upsample)
        score_logit    [B]  float32 (sigmoid: the box is on the target)
    Template slot 0 is the initial template: the score head compares the box with it."""

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        check_model_config(cfg)
        d = cfg.d_model
        self.grid = cfg.search_size // cfg.patch_size
        self.tokens_per_template = (cfg.template_size // cfg.patch_size) ** 2
        with nnx.use_eager_sharding(False):  # logical axes only; the trainer shards later
            self.backbone = MixViT(cfg, dtype=dtype, rngs=rngs)
            self.box_head = CornerHead(d, cfg.corner_dim, upsample=cfg.get("corner_upsample", 1),
                                       dtype=dtype, rngs=rngs)
            self.score = ScorePredictionModule(d, cfg.num_heads, cfg.score_hidden,
                                               cfg.score_pool, dtype=dtype, rngs=rngs)

    def heads(self, template_tokens, search_tokens):
        """Backbone outputs [B, Nt, D], [B, Ns, D] -> the output dict."""
        B, _, D = search_tokens.shape
        search_map = search_tokens.reshape(B, self.grid, self.grid, D)
        boxes, corner_logits = self.box_head(search_map)
        score_logit = self.score(search_map, template_tokens[:, :self.tokens_per_template], boxes)
        return {"boxes": boxes, "corner_logits": corner_logits, "score_logit": score_logit}

    def __call__(self, templates, search):
        return self.heads(*self.backbone(templates, search))

    def encode_templates(self, templates):
        """templates [B, n, T, T, 3] -> cache: {"k", "v": [L, B, Nt, H, d_h] (every layer's
        template keys / values), "template_tokens": [B, Nt, D]}. Run once per template update."""
        tokens, k, v = self.backbone.encode_templates(templates)
        return {"k": k, "v": v, "template_tokens": tokens}

    def track(self, cache, search):
        """cache from encode_templates, search [B, S, S, 3] -> the output dict of
        model(templates, search), without recomputing the templates."""
        search_tokens = self.backbone.track(cache["k"], cache["v"], search)
        return self.heads(cache["template_tokens"], search_tokens)


# ----------------------------------------------------------------------------- losses
def box_loss(pred_xyxy, target_xyxy):
    """pred, target [B, 4] xyxy normalised -> (loss, metrics): 2 (1 - GIoU) + 5 |pred - target|_1,
    each averaged over the batch (L1 over the 4 coordinates too, as torch's L1Loss in the
    reference actor). The released code uses CIoU where the paper says GIoU; this is the paper's.
    Finite for degenerate boxes (detr_loss guards GIoU's divisions)."""
    pred, target = pred_xyxy.astype(jnp.float32), target_xyxy.astype(jnp.float32)
    giou = paired_generalized_box_iou(pred, target)
    giou_loss = jnp.mean(1.0 - giou)
    l1_loss = jnp.mean(jnp.abs(pred - target))
    # IoU = |A n B| / |A u B|, the tracking metric (reported, not trained)
    inter = box_area(jnp.concatenate([jnp.maximum(pred[:, :2], target[:, :2]),
                                      jnp.minimum(pred[:, 2:], target[:, 2:])], axis=-1))
    iou = inter / jnp.maximum(box_area(pred) + box_area(target) - inter, EPS)
    loss = GIOU_WEIGHT * giou_loss + L1_WEIGHT * l1_loss
    return loss, {"giou_loss": giou_loss, "l1_loss": l1_loss,
                  "iou": jax.lax.stop_gradient(jnp.mean(iou))}


def score_loss(logit, label):
    """logit [B], label [B] in {0, 1} -> (loss, metrics): BCE with logits (stage 2's only loss)."""
    logit, label = logit.astype(jnp.float32), label.astype(jnp.float32)
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logit, label))
    return loss, {"score_accuracy": jnp.mean((logit > 0) == (label > 0.5))}


def score_labels(label, iou, min_iou: float):
    """The score head's targets: label [B] (1: the target is in the search crop), iou [B] of
    the predicted box with the target. min_iou > 0: a positive whose box misses the target
    (IoU < min_iou, e.g. a box on a distractor) becomes a negative, so the score that gates
    the online template update rates the box, not only the crop (min_iou = 0: MixFormer's
    labels). No gradient through iou."""
    label = label.astype(jnp.float32)
    if min_iou <= 0:
        return label
    return label * (jax.lax.stop_gradient(iou) >= min_iou).astype(jnp.float32)


# ----------------------------------------------------------------------------- task
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count half), by ranks (Mann-Whitney U). nan without both classes."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for s in np.unique(scores):  # ties: the mean rank
        tie = scores == s
        ranks[tie] = ranks[tie].mean()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@register_task("mixformer")
class TrackingTask(Task):
    """Template / search pairs from GOT-10k-layout sequences (embedded: moving shapes) ->
    MixFormer. Stage 1 (loss.score_weight = 0) trains the box (GIoU + L1 on positives); stage 2
    (configs/mixformer.py:score) trains only `score` on positives and negatives (BCE)."""

    throughput_unit = "pairs"
    FIELD_RULES = {
        "model.patch_size": ">= 1", "model.template_size": ">= 1", "model.search_size": ">= 1",
        "model.d_model": ">= 1", "model.num_heads": ">= 1", "model.num_layers": ">= 1",
        "model.mlp_dim": ">= 1", "model.num_templates": ">= 1", "model.score_pool": ">= 1",
        "model.score_hidden": ">= 1", "model.corner_dim": ">= 4", "model.corner_upsample": ">= 1",
        "loss.box_weight": ">= 0", "loss.score_weight": ">= 0",  # a stage trains one or both
        "loss.score_min_iou": "[0, 1]",  # 0: MixFormer's labels (target in the crop or not)
        # GOT-10k's splits with a box on every frame (test has the first frame's only)
        "data.eval_split": ("val", "train"),
        "data.num_sequences": ">= 1", "data.num_frames": ">= 2", "data.image_size": ">= 1",
        "data.num_distractors": ">= 0", "data.noise": ">= 0", "data.seed": ">= 0",
        "data.template_factor": "> 0", "data.search_factor": "> 0", "data.max_gap": ">= 1",
        # 0: no jitter
        "data.scale_jitter": ">= 0", "data.center_jitter": ">= 0", "data.template_jitter": ">= 0",
        "data.negative_ratio": "[0, 1)", "data.samples_per_epoch": ">= 1",
        "data.eval_samples": ">= 1",
        "track.update_interval": ">= 1", "track.score_threshold": "[0, 1]", "track.margin": ">= 0",
    }

    def __init__(self, config):
        super().__init__(config)
        self._root = None
        self._sequences = {}

    def root(self) -> str:
        """The GOT-10k root: data.paths[0], or the embedded sequences (written once)."""
        if self._root is None:
            d = self.config.data
            if d.paths:
                self._root = d.paths[0]
            else:
                params = dict(num_sequences=d.num_sequences, num_frames=d.num_frames,
                              image_size=d.image_size, num_distractors=d.num_distractors,
                              noise=d.noise, seed=d.seed)
                self._root = embedded_dir("shapes_got10k", params, d.embedded_dir)
                tracking.write_shapes_got10k(self._root, **params)
        return self._root

    def sequences(self, split: str):
        if split not in self._sequences:
            self._sequences[split] = tracking.load_got10k(self.root(), split,
                                                          skip_bad=self.config.data.skip_bad)
        return self._sequences[split]

    def validate(self, mesh_sizes):
        m, d, lo = self.config.model, self.config.data, self.config.loss
        if m.attention != "mixed":
            raise ConfigError(f"config.model.attention={m.attention!r}: MixFormer's backbone is "
                              "its asymmetric mixed attention; allowed: mixed")
        try:
            check_model_config(m)
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        if m.num_heads % mesh_sizes["tensor"]:
            raise ConfigError(f"config.model.num_heads={m.num_heads} is not divisible by the "
                              f"tensor axis mesh.tensor={mesh_sizes['tensor']}")
        if not (lo.box_weight or lo.score_weight):
            raise ConfigError("config.loss.box_weight=0 and config.loss.score_weight=0: nothing "
                              "trains; set one of them > 0")
        if lo.score_weight and not 0 < d.negative_ratio < 1:
            raise ConfigError(f"config.data.negative_ratio={d.negative_ratio}: the score head "
                              "(loss.score_weight > 0) needs positives and negatives, 0 < ratio < 1")

    def build_model(self, rngs):
        return MixFormer(self.config.model, dtype=compute_dtype(self.config.train.compute_dtype),
                         rngs=rngs)

    def _pairs(self, split: str):
        d, m = self.config.data, self.config.model
        which = "train" if split == "train" else d.eval_split
        return tracking.tracking_pairs(
            self.sequences(which), split, template_size=m.template_size, search_size=m.search_size,
            template_factor=d.template_factor, search_factor=d.search_factor, max_gap=d.max_gap,
            num_templates=m.num_templates, scale_jitter=d.scale_jitter,
            center_jitter=d.center_jitter, negative_ratio=d.negative_ratio,
            template_jitter=d.get("template_jitter", 0.0),
            samples_per_epoch=d.samples_per_epoch if split == "train" else d.eval_samples,
            seed=self.config.seed + (0 if split == "train" else 1))

    def train_data(self):
        return self._pairs("train")

    def eval_data(self):
        return self._pairs("eval")

    def loss(self, model, batch):
        lo = self.config.loss
        out = model(batch["template"], batch["search"])
        label = batch["label"].astype(jnp.float32)
        # stage 1: GIoU + L1 on the positives only (a negative's box is meaningless)
        per_example = jax.vmap(lambda p, t: box_loss(p[None], t[None]))(out["boxes"], batch["box"])
        positives = jnp.maximum(label.sum(), 1.0)
        b_loss = jnp.sum(per_example[0] * label) / positives
        b_metrics = {k: jnp.sum(v * label) / positives for k, v in per_example[1].items()}
        score_label = score_labels(label, per_example[1]["iou"], lo.get("score_min_iou", 0.0))
        s_loss, s_metrics = score_loss(out["score_logit"], score_label)
        loss = lo.box_weight * b_loss + lo.score_weight * s_loss
        return loss, {"box_loss": b_loss, "score_loss": s_loss, **b_metrics, **s_metrics}

    def eval_outputs(self, model, batch):
        out = model(batch["template"], batch["search"])
        return {"score_logit": out["score_logit"], "label": batch["label"]}

    def eval_metrics(self, outputs):
        # stage 1 samples no negatives (data.negative_prob = 0): no AUROC to report there
        value = auroc(outputs["score_logit"], outputs["label"])
        return {} if np.isnan(value) else {"score_auroc": value}
