"""Vision Transformer (Dosovitskiy et al. 2021), the image-classification Task the vision
families share, and efficient probing of a frozen backbone (Psomas et al., "Attention, Please!").

ViT: image [B, S, S, 3] -> p x p patches, flattened and linearly embedded, + learned positions
(+ a CLS token when `model.pool="cls"`) -> pre-norm blocks x + Attn(LN(x)), x + MLP(LN(x)) ->
final LN (LayerNorm epsilon: `model.norm_eps`, 0 = 1e-6). Attention comes from the registry
(`model.attention`) with `model.causal=False`. Hugging Face ViTForImageClassification / ViTModel
checkpoints in and out: models/vit_hf.py.

Every classifier is `ImageClassifier`: a `backbone` (images -> tokens [B, N, D] and a pooled
[B, D]) and one head, chosen by `model.probe`:
  ""       `classifier`: Linear(pooled) -> logits (supervised training of everything);
  "ep"     `probe`: EfficientProbe (M queries attending to the raw tokens) -> Linear;
  "linear" `probe`: Linear(mean of the tokens).
A probe trains on a frozen backbone: `init_from=<a supervised run>`, `init_from_new="probe"`
(the probe is new), `train.trainable="^probe"` (only the probe gets gradients and optimizer
state; the trainer never touches the rest).
"""
from __future__ import annotations

import abc
import math

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import attention
from attention.layers import Mlp, compute_dtype, layer_norm, linear, param  # noqa: F401  (re-exported)
from attention.sharding import constrain
from models import images, vit_hf
from trainer.config import ConfigError
from trainer.task import Task, register_task

POOLS = ("cls", "mean")
POSEMB_INITS = ("normal", "sincos2d")  # the learned position embeddings' initialisation
PROBES = ("", "ep", "linear")


# a copy of config.model with some fields replaced (a hierarchical backbone builds each stage's
# attention at that stage's width)
attention_config = attention.registry.layer_config


def norm(d: int, cfg, *, dtype, rngs):
    """LayerNorm over d channels with config.model.norm_eps (0 or absent: layer_norm's default;
    Hugging Face's ViT and AST: 1e-12)."""
    eps = getattr(cfg, "norm_eps", 0.0)
    return layer_norm(d, dtype=dtype, rngs=rngs, **({"eps": eps} if eps else {}))


def token_positions(batch: int, n: int):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


class Block(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); x [B, N, D]."""

    def __init__(self, cfg, *, dtype, rngs, layer: int | None = None):
        self.attn_norm = norm(cfg.d_model, cfg, dtype=dtype, rngs=rngs)
        self.attn = attention.build(cfg.attention, cfg, dtype=dtype, rngs=rngs, layer=layer)
        self.mlp_norm = norm(cfg.d_model, cfg, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg.d_model, cfg.mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h, _ = self.attn(self.attn_norm(x), positions=token_positions(*x.shape[:2]))
        x = constrain(x + h, ("batch", "length", "act_embed"))
        return constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "length", "act_embed"))


def sincos_2d(grid: int, d: int, temperature: float = 10_000.0):
    """2-D sine-cosine position embeddings of a grid x grid patch grid (row-major, as `patchify`)
    [grid * grid, d]: d / 4 frequencies omega_i = temperature^(-i / (d / 4)) of the column and
    of the row, [sin(x omega), cos(x omega), sin(y omega), cos(y omega)] (MAE's
    fixed embeddings; big_vision's posemb_sincos_2d divides the exponent by d / 4 - 1). d must
    be a multiple of 4."""
    y, x = jnp.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (jnp.arange(d // 4) / (d // 4))
    x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def patchify(images, p: int):
    """[B, S, S', C] -> [B, (S/p)(S'/p), p*p*C], patches in row-major order."""
    B, H, W, C = images.shape
    x = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class ViT(nnx.Module):
    """cfg: config.model (patch_size, d_model, num_layers, num_heads, num_kv_heads, head_dim,
    mlp_dim, pool, attention, rope_theta, causal, norm_eps, posemb_init: "normal" (std 0.02) or
    "sincos2d"); image_size from config.data.
    images [B, S, S, 3] -> (tokens [B, N, D] (patch tokens, after the final LN), pooled [B, D])."""

    def __init__(self, cfg, image_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.patch_size, self.pool, self.dim = cfg.patch_size, cfg.pool, cfg.d_model
        n = (image_size // cfg.patch_size) ** 2
        d = cfg.d_model
        with nnx.use_eager_sharding(False):
            self.patch_embed = linear(cfg.patch_size ** 2 * 3, d, (None, "embed"), dtype=dtype,
                                      rngs=rngs, std=None)
            self.cls = param(rngs, nnx.initializers.zeros, (1, 1, d), (None, None, "embed")) \
                if cfg.pool == "cls" else None
            self.pos_embed = param(rngs, nnx.initializers.normal(0.02),
                                   (n + (cfg.pool == "cls"), d), (None, "embed"))
            if getattr(cfg, "posemb_init", "normal") == "sincos2d":
                # learned, starting from 2-D sin-cos (the CLS row, if any, stays random): with
                # unit-scale positions attention can tell patches apart from step 0, which
                # tasks that hinge on where things are (motion) need to leave their plateau
                table = sincos_2d(image_size // cfg.patch_size, d).astype(self.pos_embed.dtype)
                self.pos_embed[...] = self.pos_embed[...].at[-n:].set(table)
            self.blocks = nnx.List([Block(cfg, dtype=dtype, rngs=rngs, layer=i)
                                    for i in range(cfg.num_layers)])
            self.final_norm = norm(d, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, images):
        x = self.patch_embed(patchify(images, self.patch_size))
        if self.cls is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype),
                                                  (x.shape[0], 1, x.shape[2])), x], axis=1)
        x = constrain(x + self.pos_embed[...].astype(x.dtype), ("batch", "length", "act_embed"))
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.cls is not None:
            return x[:, 1:], x[:, 0]
        return x, x.mean(axis=1)


# ----------------------------------------------------------------------------- heads
class EfficientProbe(nnx.Module):
    """Efficient probing (Psomas et al.; billpsomas/efficient-probing poolings/ep.py).

    M learnable queries q_m [D]; keys are the raw tokens X [N, D] (no W_k); V = X W_v with
    W_v: D -> D / d_out, split into M slices V^(m) of D / (d_out M) channels;
        o_m = softmax(q_m X^T / sqrt(D)) V^(m),   features = concat_m o_m   [D / d_out]
    then a linear classifier. x [B, N, D] -> logits [B, K]."""

    def __init__(self, d: int, num_classes: int, num_queries: int, d_out: int, *, dtype, rngs):
        self.num_queries = num_queries
        self.queries = param(rngs, nnx.initializers.normal(0.02), (num_queries, d),
                             (None, "embed"))
        self.value = linear(d, d // d_out, ("embed", None), dtype=dtype, rngs=rngs, std=None,
                            bias=False)
        self.head = linear(d // d_out, num_classes, (None, None), dtype=dtype, rngs=rngs, std=0)

    def pool(self, x):
        """x [B, N, D] -> the concatenated query outputs [B, D / d_out]."""
        B, N, D = x.shape
        q = self.queries[...].astype(x.dtype)
        # softmax(q_m X^T / sqrt(D)) for every query m: [B, M, N]
        attn = jax.nn.softmax(jnp.einsum("md,bnd->bmn", q, x).astype(jnp.float32)
                              / math.sqrt(D), axis=-1).astype(x.dtype)
        v = self.value(x).reshape(B, N, self.num_queries, -1)  # V^(m): [B, N, M, D/(d_out M)]
        return jnp.einsum("bmn,bnmc->bmc", attn, v).reshape(B, -1)

    def __call__(self, x):
        return self.head(self.pool(x))


class LinearProbe(nnx.Module):
    """Linear classifier of the mean token. x [B, N, D] -> logits [B, K]."""

    def __init__(self, d: int, num_classes: int, *, dtype, rngs):
        self.head = linear(d, num_classes, ("embed", None), dtype=dtype, rngs=rngs, std=0)

    def __call__(self, x):
        return self.head(x.mean(axis=1))


class ImageClassifier(nnx.Module):
    """`backbone` (images -> tokens, pooled) and either `classifier` (model.probe = "") or
    `probe` ("ep" / "linear"); the names are what init_from and train.trainable match.
    model.classifier_norm: a LayerNorm on the pooled features before the classifier (AST's
    head; named `classifier_norm`, so "^classifier" patterns take it with the classifier).
    images [B, S, S, 3] -> logits [B, num_classes] float32."""

    def __init__(self, backbone: nnx.Module, cfg, *, dtype, rngs):
        self.backbone = backbone
        d, k = backbone.dim, cfg.num_classes
        with nnx.use_eager_sharding(False):
            # zeros (big_vision's head); a family may ask for a small random head instead
            # (model.classifier_std): a zero head passes no gradient into the body at step 0
            self.classifier = linear(d, k, ("embed", None), dtype=dtype, rngs=rngs,
                                     std=float(getattr(cfg, "classifier_std", 0.0))) \
                if cfg.probe == "" else None
            self.classifier_norm = norm(d, cfg, dtype=dtype, rngs=rngs) \
                if cfg.probe == "" and getattr(cfg, "classifier_norm", False) else None
            self.probe = (EfficientProbe(d, k, cfg.probe_queries, cfg.probe_d_out, dtype=dtype,
                                         rngs=rngs) if cfg.probe == "ep" else
                          LinearProbe(d, k, dtype=dtype, rngs=rngs) if cfg.probe == "linear"
                          else None)

    def __call__(self, images):
        tokens, pooled = self.backbone(images)
        if self.classifier_norm is not None:
            pooled = self.classifier_norm(pooled)
        logits = self.classifier(pooled) if self.probe is None else self.probe(tokens)
        return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------- task
class ClassificationTask(Task):
    """Image classification: procedurally drawn shapes (models/images.py) by default, an
    ImageFolder tree when `config.data.paths=(root,)`. A family subclasses it and implements
    build_backbone (and validate_backbone for its own fields).

    Fields: data.image_size, data.num_train, data.num_eval, data.max_shapes, data.noise (shapes
    only); model.num_classes (must equal the data's), model.probe, model.probe_queries,
    model.probe_d_out; train.label_smoothing. With match_data False (trainer.convert writing an
    imported checkpoint) model.num_classes may differ from the data's classes."""

    throughput_unit = "images"
    FIELD_RULES = {
        "model.num_classes": ">= 1", "model.num_layers": ">= 1", "model.d_model": ">= 1",
        "model.num_heads": ">= 1", "model.num_kv_heads": ">= 1", "model.mlp_dim": ">= 1",
        "model.patch_size": ">= 1",
        "model.head_dim": ">= 0",  # 0: d_model // num_heads
        "model.rope_theta": ">= 0",  # 0: no RoPE (learned position embeddings)
        "model.probe": PROBES, "model.probe_queries": ">= 1", "model.probe_d_out": ">= 1",
        "train.label_smoothing": "[0, 1)",
        "data.image_size": ">= 1", "data.num_train": ">= 1", "data.num_eval": ">= 1",
        "data.max_shapes": ">= 1", "data.noise": ">= 0",  # 0: clean shapes
    }
    # config.model fields that change what a trained backbone computes without changing its
    # parameters' shapes (the trainer reports shape mismatches itself): a probe's init_from
    # source must agree on them
    BACKBONE_FIELDS = ("attention", "causal", "rope_theta", "softmax_bias", "norm_eps")

    def __init__(self, config):
        super().__init__(config)
        self._data = None

    def check_init_from(self, source_config):
        def norm(x):
            return tuple(x) if isinstance(x, (list, tuple)) else x

        src, ours = source_config.get("model", {}), self.config.model
        diff = [f"config.model.{f}={norm(ours[f])!r}, but the source has {norm(src[f])!r}"
                for f in self.BACKBONE_FIELDS if f in src and f in ours
                and norm(src[f]) != norm(ours[f])]
        if source_config.get("task", self.config.task) != self.config.task:
            diff.insert(0, f"config.task={self.config.task!r}, but the source is a "
                           f"{source_config['task']!r} run")
        if diff:
            raise ConfigError(f"config.init_from={self.config.init_from!r} was trained with "
                              "another backbone:\n  " + "\n  ".join(diff))

    # ---- family hooks
    @abc.abstractmethod
    def build_backbone(self, rngs, dtype) -> nnx.Module:
        """images [B, S, S, 3] -> (tokens [B, N, D], pooled [B, D]); has .dim = D."""

    def validate_backbone(self, mesh_sizes) -> None:
        """ConfigError for the family's own model fields."""

    # ---- checks
    def validate(self, mesh_sizes):
        c, m = self.config, self.config.model
        allowed = attention.names(bidirectional=True)
        if not m.causal and m.attention not in allowed:
            raise ConfigError(
                f"config.model.attention={m.attention!r} is causal only, and a vision encoder "
                f"attends bidirectionally (model.causal=False); allowed: {', '.join(allowed)}")
        self.validate_data()
        self.validate_backbone(mesh_sizes)
        if m.probe == "ep":
            d, q, o = self.feature_dim(), m.probe_queries, m.probe_d_out
            if d % (q * o):
                raise ConfigError(
                    f"config.model.probe_queries={q} x probe_d_out={o} must divide the "
                    f"backbone's width {d} (each query reads D / (d_out M) value channels)")

    def validate_data(self) -> None:
        """ConfigError for the data fields (a family with other data overrides it)."""
        c, m = self.config, self.config.model
        if len(c.data.paths) > 1:
            raise ConfigError(f"config.data.paths: one ImageFolder root, got {len(c.data.paths)} "
                              f"paths {tuple(c.data.paths)}")
        _, _, classes = self.data()
        if m.num_classes != len(classes) and self.match_data:
            raise ConfigError(f"config.model.num_classes={m.num_classes}, but "
                              f"{self.data_description()} has "
                              f"{len(classes)} classes ({', '.join(classes[:10])}"
                              f"{', ...' if len(classes) > 10 else ''}); set "
                              f"--config.model.num_classes={len(classes)}")

    def data_description(self) -> str:
        """The data this run reads, for messages."""
        paths = self.config.data.paths
        return (f"the ImageFolder {paths[0]!r}" if paths
                else "the shapes data (models/images.py SHAPE_KINDS)")

    def feature_dim(self) -> int:
        """The backbone's token width D (what a probe reads)."""
        return self.config.model.d_model

    # ---- model
    def build_model(self, rngs):
        dtype = compute_dtype(self.config.train.compute_dtype)
        return ImageClassifier(self.build_backbone(rngs, dtype), self.config.model, dtype=dtype,
                               rngs=rngs)

    # ---- data
    def data(self):
        """(train dataset, eval dataset, class names), built once."""
        if self._data is None:
            d = self.config.data
            if d.paths:
                kw = dict(image_size=d.image_size, seed=self.config.seed, skip_bad=d.skip_bad)
                train, classes = images.image_folder(d.paths[0], "train", **kw)
                evals, _ = images.image_folder(d.paths[0], "eval", **kw)
            else:
                kw = dict(image_size=d.image_size, num_train=d.num_train, num_eval=d.num_eval,
                          seed=self.config.seed, max_shapes=d.max_shapes, noise=d.noise)
                train = images.shapes_classification("train", **kw)
                evals = images.shapes_classification("eval", **kw)
                classes = list(images.SHAPE_KINDS)
            self._data = (train, evals, list(classes))
        return self._data

    def train_data(self) -> grain.MapDataset:
        return self.data()[0]

    def eval_data(self) -> grain.MapDataset:
        return self.data()[1]

    # ---- loss
    def inputs(self, batch):
        """The model's input from a batch (an audio family computes spectrograms here)."""
        return batch["image"].astype(compute_dtype(self.config.train.compute_dtype))

    def loss(self, model, batch):
        labels = batch["label"]
        logits = model(self.inputs(batch))
        # soft targets where the data mixes examples (mixup), else one-hot labels
        hard = batch["targets"] if "targets" in batch else jax.nn.one_hot(labels, logits.shape[-1])
        targets = optax.smooth_labels(hard, self.config.train.label_smoothing)
        xent = optax.softmax_cross_entropy(logits, targets).mean()
        return xent, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), "xent": xent}

    def describe(self):
        m = self.config.model
        head = {"": "supervised classifier", "ep": f"EP probe ({m.probe_queries} queries)",
                "linear": "linear probe"}[m.probe]
        return (f"{self.name}: {head}, {m.num_classes} classes, {self.data_description()}",)


@register_task("vit")
class ViTTask(ClassificationTask):
    """ViT image classification (configs/vit.py). Hugging Face ViTForImageClassification and
    ViTModel checkpoints in and out: models/vit_hf.py."""

    BACKBONE_FIELDS = (*ClassificationTask.BACKBONE_FIELDS, "pool")
    FIELD_RULES = {"model.pool": POOLS, "model.norm_eps": ">= 0",  # norm_eps 0: the default
                   "model.posemb_init": POSEMB_INITS}
    hf_importers = vit_hf.IMPORTERS

    def validate_backbone(self, mesh_sizes):
        m, s = self.config.model, self.config.data.image_size
        if s % m.patch_size:
            raise ConfigError(f"config.data.image_size={s} is not a multiple of "
                              f"config.model.patch_size={m.patch_size}")
        tp = mesh_sizes["tensor"]
        for field in ("num_heads", "num_kv_heads"):
            if m[field] % tp:
                raise ConfigError(f"config.model.{field}={m[field]} is not divisible by the "
                                  f"tensor axis mesh.tensor={tp}")
        if m.num_heads % m.num_kv_heads:
            raise ConfigError(f"config.model.num_heads={m.num_heads} must be a multiple of "
                              f"config.model.num_kv_heads={m.num_kv_heads}")
        if m.get("posemb_init", "normal") == "sincos2d" and m.d_model % 4:
            raise ConfigError(f"config.model.posemb_init='sincos2d' needs d_model divisible by 4 "
                              f"(a sine and a cosine per axis), got d_model={m.d_model}")
        if not m.head_dim and m.d_model % m.num_heads:
            raise ConfigError(f"config.model.d_model={m.d_model} is not divisible by "
                              f"num_heads={m.num_heads}; set model.head_dim explicitly")

    def build_backbone(self, rngs, dtype):
        return ViT(self.config.model, self.config.data.image_size, dtype=dtype, rngs=rngs)
