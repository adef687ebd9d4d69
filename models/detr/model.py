"""Plain DETR with box-to-pixel relative position bias (Lin et al., ICCV 2023) and its Task.

    image [B, S, S, 3] --backbone (3x3 convs, log2 s stride-2 stages of model.backbone_depth)-->
      feature map [B, H, W, C], stride s
      --1x1 projection, + 2D sine positions--> encoder (self-attention from the attention
      registry, bidirectional) --> memory [B, H*W, d] (keys of every cross-attention add the
      positions again)
    decoder: Q learned content queries and learned reference boxes b_0 [Q, 4] (cx, cy, w, h);
      layer l: self-attention among the queries (+ query positions from b_{l-1}),
               global cross-attention to the memory with the BoxRPB bias of b_{l-1}
               (attention/boxrpb.py), FFN; heads on the layer's output:
               logits_l, and b_l = sigmoid(delta_l + sigmoid^-1(b_{l-1}))  (iterative refinement;
               the next layer's reference is stop_gradient(b_l), as Deformable / Plain DETR)
    outputs: the last layer's logits / boxes, the earlier layers' as auxiliary outputs, and,
    with hybrid matching, a second (one-to-many) group of queries that only trains.

Single scale (Plain DETR's point): one stride-s map, global cross-attention. The loss, matching
and post-processing live in models/detr/loss.py; data and COCO metrics in models/detr/coco.py (the
train split's augmentation: config.data.augment, models/detr/coco.py AUGMENTS).
Shapes: images [B, S, S, 3] float32 in [-1, 1] -> logits [B, Q, K], boxes [B, Q, 4] in (0, 1).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention
from attention.boxrpb import ENCODINGS, GlobalCrossAttention
from attention.layers import compute_dtype
from models.detr import loss as detr_loss
from models.detr import coco
from trainer.config import ConfigError
from trainer.data import embedded_dir
from trainer.task import Task, register_task

CLASS_LOSSES = ("focal", "softmax")
MATCHERS = ("scipy", "optax")


def inverse_sigmoid(x, eps: float = 1e-5):
    x = jnp.clip(x, eps, 1 - eps)
    return jnp.log(x / (1 - x))


def sine_embedding(coords, dim: int, temperature: float = 10000.0):
    """coords [..., n] in [0, 1] -> [..., n * dim]: DETR's sine / cosine embedding of each
    coordinate scaled to 2 pi, dim / 2 frequencies each."""
    freqs = temperature ** (2 * (jnp.arange(dim // 2) / dim))
    x = coords[..., None] * (2 * math.pi) / freqs  # [..., n, dim / 2]
    emb = jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)
    return emb.reshape(*coords.shape[:-1], -1)


def grid_positions(h: int, w: int, d: int):
    """[h * w, d]: the sine embedding of each feature cell's centre (y, x) normalised to [0, 1]."""
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
    return sine_embedding(jnp.stack([ys.ravel(), xs.ravel()], -1), d // 2)


def _linear(din, dout, *, dtype, rngs, logical=(None, None), bias_init=None, zero=False):
    init = nnx.initializers.zeros if zero else nnx.initializers.lecun_normal()
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.with_partitioning(init, logical),
                      bias_init=bias_init or nnx.initializers.zeros, rngs=rngs)


class MLP(nnx.Module):
    """Linear -> ReLU -> ... -> Linear (DETR's box head and query-position MLP)."""

    def __init__(self, dims, *, dtype, rngs, zero_last=False):
        self.layers = nnx.List([_linear(a, b, dtype=dtype, rngs=rngs,
                                        zero=zero_last and i == len(dims) - 2)
                                for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class Backbone(nnx.Module):
    """log2(stride) stages, each a 3x3 stride-2 convolution and depth - 1 stride-1 ones, every
    convolution followed by GroupNorm + ReLU: [B, S, S, 3] -> [B, S/s, S/s, C]. A small
    single-scale stand-in for Plain DETR's ViT / Swin backbone."""

    def __init__(self, channels, stride: int, *, depth: int = 1, dtype, rngs):
        n = int(round(math.log2(stride)))
        widths = [channels[min(i, len(channels) - 1)] for i in range(n)]
        self.convs = nnx.List()
        self.norms = nnx.List()
        cin = 3
        for c in widths:
            for j in range(depth):
                self.convs.append(nnx.Conv(cin, c, (3, 3), strides=(1, 1) if j else (2, 2),
                                           padding="SAME", dtype=dtype, param_dtype=jnp.float32,
                                           rngs=rngs))
                self.norms.append(nnx.GroupNorm(c, num_groups=min(8, c), dtype=dtype,
                                                param_dtype=jnp.float32, rngs=rngs))
                cin = c
        self.out_channels = cin

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        return x


def _encoder_attention_config(m):
    """The registry's self-attention fields for the encoder: bidirectional, no RoPE (positions
    are the added sine embeddings); the mechanism's options (config.model) are kept."""
    return attention.registry.layer_config(m, num_kv_heads=m.num_heads, head_dim=0,
                                           rope_theta=0.0, causal=False, num_layers=m.enc_layers)


class EncoderLayer(nnx.Module):
    def __init__(self, m, *, dtype, rngs):
        self.norm1 = nnx.LayerNorm(m.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.attn = attention.build(m.attention, _encoder_attention_config(m), dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(m.d_model, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.mlp = MLP((m.d_model, m.mlp_dim, m.d_model), dtype=dtype, rngs=rngs)

    def __call__(self, x, positions):
        h, _ = self.attn(self.norm1(x), positions=positions)
        x = x + h
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nnx.Module):
    """Pre-norm: self-attention among queries, BoxRPB cross-attention, FFN."""

    def __init__(self, m, *, dtype, rngs):
        d = m.d_model
        self.norm1 = nnx.LayerNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.self_attn = nnx.MultiHeadAttention(m.num_heads, d, dtype=dtype,
                                                param_dtype=jnp.float32, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.cross_attn = GlobalCrossAttention(d, m.num_heads, rpb=m.rpb, rpb_hidden=m.rpb_hidden,
                                               rpb_encoding=m.rpb_encoding, dtype=dtype, rngs=rngs)
        self.norm3 = nnx.LayerNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.mlp = MLP((d, m.mlp_dim, d), dtype=dtype, rngs=rngs)

    def __call__(self, tgt, query_pos, memory, *, memory_pos, ref_boxes, feat_hw, stride,
                 memory_mask, self_mask):
        h = self.norm1(tgt)
        tgt = tgt + self.self_attn(h + query_pos, h + query_pos, h, mask=self_mask)
        # keys see the cells' positions again (DETR adds them at every cross-attention)
        tgt = tgt + self.cross_attn(self.norm2(tgt) + query_pos, memory, ref_boxes=ref_boxes,
                                    feat_hw=feat_hw, stride=stride, memory_mask=memory_mask,
                                    memory_pos=memory_pos)
        return tgt + self.mlp(self.norm3(tgt))


class PlainDETR(nnx.Module):
    """cfg: config.model (d_model, num_heads, mlp_dim, enc_layers, dec_layers, num_queries,
    num_queries_one2many, num_classes, stride, backbone_channels, backbone_depth, rpb, rpb_hidden,
    rpb_encoding, attention) and the class loss (focal: K logits; softmax: K + 1)."""

    def __init__(self, cfg, *, class_loss: str = "focal", dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.d_model
        self.stride = cfg.stride
        self.num_queries = cfg.num_queries
        self.num_one2many = cfg.num_queries_one2many
        with nnx.use_eager_sharding(False):
            self.backbone = Backbone(tuple(cfg.backbone_channels), cfg.stride,
                                     depth=cfg.get("backbone_depth", 1), dtype=dtype, rngs=rngs)
            self.input_proj = _linear(self.backbone.out_channels, d, dtype=dtype, rngs=rngs)
            self.encoder = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs)
                                     for _ in range(cfg.enc_layers)])
            self.enc_norm = nnx.LayerNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            q = cfg.num_queries + cfg.num_queries_one2many
            self.query_content = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (q, d)))
            # reference boxes spread over the image: centres uniform, sides 0.2 (pre-sigmoid)
            key = rngs.params()
            centres = jax.random.uniform(key, (q, 2), minval=0.05, maxval=0.95)
            self.query_boxes = nnx.Param(inverse_sigmoid(
                jnp.concatenate([centres, jnp.full((q, 2), 0.2)], -1)))
            self.query_pos = MLP((d, d, d), dtype=dtype, rngs=rngs)  # of sine(b): 4 x d / 4
            self.decoder = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                     for _ in range(cfg.dec_layers)])
            self.dec_norm = nnx.LayerNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            k = cfg.num_classes + (class_loss == "softmax")
            # focal: every class starts at prior probability 0.01 (RetinaNet's bias init)
            prior = nnx.initializers.constant(-math.log((1 - 0.01) / 0.01)) \
                if class_loss == "focal" else nnx.initializers.zeros
            self.class_head = _linear(d, k, dtype=dtype, rngs=rngs, bias_init=prior)
            # zero last layer: the first prediction is the reference box itself
            self.box_head = MLP((d, d, d, 4), dtype=dtype, rngs=rngs, zero_last=True)

    def __call__(self, images, pad_mask=None):
        """images [B, S, S, 3], pad_mask [B, S, S] bool (True = image) -> outputs dict:
        logits [B, Q, K], boxes [B, Q, 4], aux: [{logits, boxes}] * (L - 1), and with hybrid
        matching one_to_many: {logits, boxes, aux} of the second query group."""
        B = images.shape[0]
        feat = self.backbone(images)
        _, H, W, _ = feat.shape
        memory = self.input_proj(feat.reshape(B, H * W, -1))
        d = memory.shape[-1]
        pos = grid_positions(H, W, d).astype(memory.dtype)[None]
        memory = memory + pos
        positions = jnp.broadcast_to(jnp.arange(H * W, dtype=jnp.int32), (B, H * W))
        for layer in self.encoder:
            memory = layer(memory, positions)
        memory = self.enc_norm(memory)
        memory_mask = None
        if pad_mask is not None:  # a feature cell is valid when its top-left pixel is
            memory_mask = pad_mask[:, ::self.stride, ::self.stride].reshape(B, H * W)

        Q = self.query_content.shape[0]
        tgt = jnp.broadcast_to(self.query_content[...].astype(memory.dtype), (B, Q, d))
        ref = jax.nn.sigmoid(jnp.broadcast_to(self.query_boxes[...], (B, Q, 4)))
        # the one-to-one and one-to-many groups do not see each other (H-DETR's hybrid matching)
        group = jnp.arange(Q) >= self.num_queries
        self_mask = (group[:, None] == group[None, :])[None, None]
        all_logits, all_boxes = [], []
        for layer in self.decoder:
            query_pos = self.query_pos(sine_embedding(ref, d // 4).astype(memory.dtype))
            tgt = layer(tgt, query_pos, memory, memory_pos=pos, ref_boxes=ref, feat_hw=(H, W),
                        stride=self.stride, memory_mask=memory_mask, self_mask=self_mask)
            h = self.dec_norm(tgt)
            # b_l = sigmoid(delta_l + sigmoid^-1(b_{l-1}))  (iterative box refinement)
            boxes = jax.nn.sigmoid(self.box_head(h).astype(jnp.float32) + inverse_sigmoid(ref))
            all_logits.append(self.class_head(h).astype(jnp.float32))
            all_boxes.append(boxes)
            ref = jax.lax.stop_gradient(boxes)

        def group_outputs(sl):
            layers = [{"logits": lg[:, sl], "boxes": bx[:, sl]}
                      for lg, bx in zip(all_logits, all_boxes)]
            return dict(layers[-1], aux=layers[:-1])

        out = group_outputs(slice(0, self.num_queries))
        if self.num_one2many:
            out["one_to_many"] = group_outputs(slice(self.num_queries, Q))
        return out


# ----------------------------------------------------------------------------- task
@register_task("detr")
class DetectionTask(Task):
    """Object detection on COCO-format data (embedded: shapes scenes written as COCO once)."""

    throughput_unit = "images"
    _paths = _eval_dataset = _eval_index = None  # built on first use
    FIELD_RULES = {
        "model.num_classes": ">= 1", "model.d_model": ">= 1", "model.num_heads": ">= 1",
        "model.mlp_dim": ">= 1", "model.enc_layers": ">= 1", "model.dec_layers": ">= 1",
        "model.num_queries": ">= 1",
        "model.num_queries_one2many": ">= 0",  # 0: no one-to-many group (hybrid matching off)
        "model.stride": ">= 2", "model.backbone_channels": ">= 1", "model.backbone_depth": ">= 1",
        "model.rpb_hidden": ">= 1", "model.rpb_encoding": ENCODINGS,
        "loss.class_loss": CLASS_LOSSES, "loss.matcher": MATCHERS,
        # 0 switches a term off (the Hungarian cost and the loss share the weights)
        "loss.w_class": ">= 0", "loss.w_l1": ">= 0", "loss.w_giou": ">= 0",
        "loss.eos_coef": ">= 0", "loss.one_to_many_k": ">= 0",
        "eval.top_k": ">= 1",
        "data.image_size": ">= 1", "data.max_objects": ">= 1", "data.augment": coco.AUGMENTS,
        "data.num_train": ">= 1", "data.num_eval": ">= 1",
        "data.min_shapes": ">= 1", "data.max_shapes": ">= 1",
        "data.noise": ">= 0", "data.seed": ">= 0",
    }

    # ---- data locations
    def paths(self) -> dict:
        """{train_json, train_images, eval_json, eval_images}: data.paths=(root,) holds
        root/annotations/instances_<split>.json and root/<split>/ for data.train_split and
        data.eval_split; empty data.paths writes (once) and reads the embedded shapes scenes."""
        if self._paths is not None:
            return self._paths
        d = self.config.data
        if not d.paths:
            params = dict(num_train=d.num_train, num_eval=d.num_eval, image_size=d.image_size,
                          min_shapes=d.min_shapes, max_shapes=d.max_shapes, kinds=list(d.kinds),
                          noise=d.noise, seed=d.seed)
            root = embedded_dir("shapes_coco", params, d.embedded_dir)
            written = coco.write_shapes_coco(root, **dict(params, kinds=tuple(d.kinds)))
            self._paths = {"train_json": written["train_annotations"],
                           "train_images": written["train_images"],
                           "eval_json": written["eval_annotations"],
                           "eval_images": written["eval_images"]}
            return self._paths
        root, paths = d.paths[0], {}
        for which, split in (("train", d.train_split), ("eval", d.eval_split)):
            paths[f"{which}_json"] = os.path.join(root, "annotations", f"instances_{split}.json")
            paths[f"{which}_images"] = os.path.join(root, split)
            for p in (paths[f"{which}_json"], paths[f"{which}_images"]):
                if not os.path.exists(p):
                    raise ConfigError(
                        f"config.data.paths: {p} does not exist (expected the COCO layout "
                        f"root/annotations/instances_<split>.json and root/<split>/ with "
                        f"data.train_split={d.train_split!r}, data.eval_split={d.eval_split!r})")
        self._paths = paths
        return paths

    def eval_index(self):
        if self._eval_index is None:
            p = self.paths()
            self._eval_index = (coco.load_coco(p["eval_json"], p["eval_images"]),
                                coco.coco_ground_truth(p["eval_json"]))
        return self._eval_index

    # ---- checks
    def validate(self, mesh_sizes):
        m, d, lo = self.config.model, self.config.data, self.config.loss
        if d.min_shapes > d.max_shapes or d.max_shapes > d.max_objects:
            raise ConfigError(f"config.data: min_shapes={d.min_shapes} <= max_shapes="
                              f"{d.max_shapes} <= max_objects={d.max_objects} (the boxes a "
                              "batch holds per image) is needed")
        if m.stride & (m.stride - 1) or d.image_size % m.stride:
            raise ConfigError(f"config.model.stride={m.stride} must be a power of two >= 2 "
                              f"dividing data.image_size={d.image_size}")
        if m.d_model % m.num_heads or m.d_model % 4:
            raise ConfigError(f"config.model.d_model={m.d_model} must be divisible by "
                              f"num_heads={m.num_heads} and by 4")
        if m.num_heads % mesh_sizes["tensor"]:
            raise ConfigError(f"config.model.num_heads={m.num_heads} is not divisible by the "
                              f"tensor axis mesh.tensor={mesh_sizes['tensor']}")
        if lo.one_to_many_k and not m.num_queries_one2many:
            raise ConfigError("config.loss.one_to_many_k > 0 needs model.num_queries_one2many > 0 "
                              "(the second query group hybrid matching trains)")
        ok = attention.names(bidirectional=True)
        if m.attention not in ok:
            raise ConfigError(f"config.model.attention={m.attention!r} is causal only; the DETR "
                              f"encoder needs a bidirectional mechanism: {', '.join(ok)}")
        num = coco.num_classes(self.paths()["train_json"])
        if num != m.num_classes:
            raise ConfigError(f"config.model.num_classes={m.num_classes}, but the data has {num} "
                              f"categories ({self.paths()['train_json']})")

    # ---- model and data
    def build_model(self, rngs):
        return PlainDETR(self.config.model, class_loss=self.config.loss.class_loss,
                         dtype=compute_dtype(self.config.train.compute_dtype), rngs=rngs)

    def _dataset(self, split):
        p, d = self.paths(), self.config.data
        which = "train" if split == "train" else "eval"
        return coco.coco_detection(p[f"{which}_json"], p[f"{which}_images"], split,
                                   image_size=d.image_size, max_objects=d.max_objects,
                                   seed=self.config.seed, augment=d.get("augment", "detr"),
                                   skip_bad=d.skip_bad)

    def train_data(self):
        return self._dataset("train")

    def eval_data(self):
        if self._eval_dataset is None:
            self._eval_dataset = self._dataset("eval")
        return self._eval_dataset

    # ---- loss
    def loss(self, model, batch):
        lo = self.config.loss
        outputs = model(batch["image"], batch["pad_mask"])
        targets = {k: batch[k] for k in ("labels", "boxes", "box_mask")}
        return detr_loss.set_loss(outputs, targets, class_loss=lo.class_loss, w_class=lo.w_class,
                                  w_l1=lo.w_l1, w_giou=lo.w_giou, eos_coef=lo.eos_coef,
                                  matcher=lo.matcher, aux=lo.aux, one_to_many_k=lo.one_to_many_k)

    # ---- evaluation: top-k detections -> COCO metrics, boxes drawn for TensorBoard
    def eval_outputs(self, model, batch):
        out = model(batch["image"], batch["pad_mask"])
        scores, labels, boxes = detr_loss.postprocess(out["logits"], out["boxes"],
                                                      top_k=self.config.eval.top_k,
                                                      class_loss=self.config.loss.class_loss)
        return {"scores": scores, "labels": labels, "boxes": boxes, "image_id": batch["image_id"],
                "scale": batch["scale"], "orig_size": batch["orig_size"], "id": batch["id"]}

    def eval_metrics(self, outputs):
        index, ground_truth = self.eval_index()
        dets = coco.to_coco_detections(outputs["image_id"], outputs["scores"], outputs["labels"],
                                       outputs["boxes"], outputs["scale"], index.category_ids,
                                       image_size=self.config.data.image_size,
                                       orig_size=outputs["orig_size"])
        # only the evaluated images count (eval.batches may cover part of the split)
        return coco.coco_evaluate(ground_truth, dets,
                                  image_ids=sorted({int(i) for i in outputs["image_id"]}))

    def eval_images(self, outputs, count: int = 4, threshold: float = 0.5):
        """The first `count` eval images with their ground truth (green) and the detections
        scoring >= threshold (red), side by side: uint8 [S, count * S, 3]."""
        ds, S = self.eval_data(), self.config.data.image_size
        tiles = []
        for i in range(min(count, len(outputs["id"]))):
            ex = ds[int(outputs["id"][i])]
            img = np.clip((np.asarray(ex["image"]) + 1) * 127.5, 0, 255).astype(np.uint8)
            cx, cy, w, h = np.asarray(ex["boxes"])[np.asarray(ex["box_mask"])].T
            gt = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * S
            keep = outputs["scores"][i] >= threshold
            _draw_boxes(img, gt, (0, 255, 0))
            _draw_boxes(img, outputs["boxes"][i][keep] * S, (255, 0, 0))
            tiles.append(img)
        return {"detections": np.concatenate(tiles, axis=1)} if tiles else {}


def _draw_boxes(img, boxes_xyxy, colour):
    """Draws 1-pixel rectangles in place. img [S, S, 3] uint8; boxes [N, 4] pixels."""
    S = img.shape[0]
    for x1, y1, x2, y2 in np.asarray(boxes_xyxy):
        x1, y1 = int(np.clip(x1, 0, S - 1)), int(np.clip(y1, 0, S - 1))
        x2, y2 = int(np.clip(x2 - 1, 0, S - 1)), int(np.clip(y2 - 1, 0, S - 1))
        img[y1, x1:x2 + 1] = img[y2, x1:x2 + 1] = colour
        img[y1:y2 + 1, x1] = img[y1:y2 + 1, x2] = colour
