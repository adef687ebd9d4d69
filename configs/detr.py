"""Plain DETR with BoxRPB (models/detr/model.py) on COCO-format data.

    python -m trainer.main --config=configs/detr.py:tiny --workdir=runs/detr_tiny
    python -m trainer.main --config=configs/detr.py:tiny --workdir=runs/detr_coco \
        --config.data.paths=/data/coco --config.data.train_split=train2017 \
        --config.data.eval_split=val2017 --config.model.num_classes=80 \
        --config.data.image_size=512 --config.data.augment=detr
    # evaluate a trained run only (COCO AP on the eval split)
    python -m trainer.main --config=configs/detr.py:tiny --workdir=runs/detr_eval \
        --config.train.steps=0 --config.init_from=runs/detr_tiny

Variants: tiny (the embedded shapes scenes: 64x64, 1-3 squares / circles, 2 classes; lr 1e-3
held high, batch 32, clip 0.1 as the recipe FAMILIES.md D measured; train augmentation flip
only), tiny_no_rpb (the same without BoxRPB: plain global cross-attention), smoke (tests: a few
steps, the DETR augmentation). The embedded scenes are written once as a COCO layout (JSON +
PNG) under ~/.cache/polyformer and read by the same loader as real COCO data.

What the tiny recipe needs (bench/detr.py, tiny, COCO AP50 at steps 1000 / 2000 / 4000):
- data.augment (train split): "detr" (the default; models/detr/coco.py: random crop branch, long
  side resized to 0.6..1 of the canvas, flip) suits real data, but on the 4096 shapes scenes
  shrunken, padded and cropped training scenes are another distribution than the full-canvas
  eval scenes (backbone_depth 1): 0.539 at 4000 with "detr", 0.486 / 0.605 / 0.661 with "flip"
  ("none": 0.537 / 0.625 at 1000 / 2000; without BoxRPB, 4000: 0.485 -> 0.543).
- model.backbone_depth 2 (two 3x3 convolutions per stride-2 stage, receptive field 15 -> 43
  px, for shapes 14-54 px across): 0.432 / 0.681 at 1000 / 2000 against 0.486 / 0.605.
- the focal class loss (class 2, L1 5, GIoU 2): DETR's softmax + eos 0.1 with class weight 1
  gave 0.443 / 0.556 at 1000 / 2000.
"""
import ml_collections

from trainer.cli import finish_config
from trainer.config import base_config, variant_fields

VARIANTS = {
    "tiny": dict(steps=4000, batch=32, eval_every=1000, augment="flip"),
    "tiny_no_rpb": dict(steps=4000, batch=32, eval_every=1000, augment="flip", rpb=False),
    "smoke": dict(steps=20, batch=8, eval_every=0, num_train=64, num_eval=16),
}


def get_config(variant=None):
    v = variant_fields(VARIANTS, variant, "tiny", "configs/detr.py")
    c = base_config()
    c.task = "detr"

    c.train.steps = v["steps"]
    c.train.global_batch_size = v["batch"]
    c.train.lr = 1e-3  # held high: decaying before matching settles stalls training
    c.train.warmup_steps = 100
    c.train.schedule_steps = 6000  # a cosine over 6000 steps: still high at step 4000
    c.train.weight_decay = 1e-4
    c.train.grad_clip_norm = 0.1
    c.train.b2 = 0.999
    c.train.log_every = 50 if v["steps"] > 100 else 1
    c.eval.every = v["eval_every"]
    c.eval.batches = 8  # x batch 32: 256 held-out images
    c.eval.top_k = 100  # detections per image (Plain DETR's PostProcess)
    c.checkpoint.every = v["eval_every"]

    d = c.data
    d.image_size = 64
    d.max_objects = 8
    # real data: data.paths=(root,) with root/annotations/instances_<split>.json, root/<split>/
    d.augment = v.get("augment", "detr")  # train: "detr" (crop + resize + flip), "flip", "none"
    d.train_split = "train"
    d.eval_split = "val"
    # the embedded shapes scenes (when data.paths is empty)
    d.num_train = v.get("num_train", 4096)
    d.num_eval = v.get("num_eval", 256)
    d.min_shapes = 1
    d.max_shapes = 3
    d.kinds = ("square", "circle")
    d.noise = 0.1
    d.seed = 0
    d.embedded_dir = ""  # "": ~/.cache/polyformer/shapes_coco_<hash of the fields above>

    m = c.model
    m.attention = "softmax"  # the encoder's self-attention (bidirectional) from the registry
    m.num_classes = 2
    m.d_model = 64
    m.num_heads = 4
    m.mlp_dim = 256
    m.enc_layers = 2
    m.dec_layers = 2
    m.num_queries = 10
    m.num_queries_one2many = 0  # > 0 with loss.one_to_many_k: hybrid matching
    m.stride = 8  # 64 px -> an 8x8 map (Plain DETR: 16 on full-size images)
    m.backbone_channels = (32, 64, 64)
    m.backbone_depth = 2  # 3x3 convolutions per stride-2 stage (the first one strided)
    m.rpb = v.get("rpb", True)
    m.rpb_hidden = 128  # the paper's 512 at full scale
    m.rpb_encoding = "linear"  # or abs_log8

    lo = c.loss = ml_collections.ConfigDict()
    lo.class_loss = "focal"  # sigmoid focal (alpha 0.25, gamma 2) or softmax (+ eos_coef)
    lo.w_class = 2.0
    lo.w_l1 = 5.0
    lo.w_giou = 2.0
    lo.eos_coef = 0.1
    lo.matcher = "scipy"  # host Hungarian (CPU / GPU); "optax": in-graph (TPU, multi-host)
    lo.aux = True  # losses on every decoder layer
    lo.one_to_many_k = 0
    return finish_config(c)
