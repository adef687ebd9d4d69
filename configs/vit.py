"""ViT image classification on procedurally drawn shapes (models/vit.py), and efficient probing.

    python -m trainer.main --config=configs/vit.py:tiny --workdir=runs/vit_tiny
    python -m trainer.main --config=configs/vit.py:probe_ep --workdir=runs/vit_probe_ep
Variants: tiny (a 2-layer ViT on 16 px shapes, well under a minute on a laptop CPU); probe_ep
and probe_linear: an EP / linear probe trained on the frozen backbone of runs/vit_tiny (train
tiny first); moh: tiny with Mixture-of-Head attention (75% of the routed heads active). The
data is the embedded shapes set (models/images.py, no download); an ImageFolder tree
(root/<class>/<image>) instead, with as many classes as model.num_classes:
    --config.data.paths=/path/to/folder --config.model.num_classes=<classes>
"""
from trainer.cli import finish_config
from trainer.config import base_config, schedule_from, variant_fields

NUM_SHAPE_CLASSES = 8  # models/images.py (the task checks model.num_classes against the data)

VARIANTS = {
    # name: (image size, patch, layers, d_model, heads, MLP, global batch, steps, lr, warmup)
    # tiny: 16 px images, 4 x 4 patches (16 tokens); ~33% held-out accuracy (chance 12.5%) in
    # ~30 s on a 2-core CPU; a ViT from scratch needs far more steps for more on this data
    "tiny": dict(image_size=16, patch_size=4, num_layers=2, d_model=64, num_heads=4,
                 mlp_dim=128, batch=32, steps=1500, lr=1e-3, warmup=50),
    # probing (PAPERS.md "Efficient Probing"): only the probe trains, the backbone is frozen
    "probe_ep": dict(base="tiny", probe="ep", init_from="runs/vit_tiny", steps=300, lr=3e-3,
                     warmup=10),
    "probe_linear": dict(base="tiny", probe="linear", init_from="runs/vit_tiny", steps=300,
                         lr=3e-3, warmup=10),
    # MoH (attention/moh.py, PAPERS.md): the tiny ViT with Mixture-of-Head attention, 3 of its 4
    # heads active per token (all routed, 75%); `model`: config.model fields over the defaults
    "moh": dict(base="tiny", attention="moh", model=dict(moh_shared_heads=0, moh_top_k=3)),
}


def classification_base(task: str, v: dict):
    """base_config() with the image-classification fields (models/vit.py ClassificationTask)
    and the variant's schedule; configs/iformer.py shares it."""
    c = schedule_from(base_config(), v, evals=3)
    c.task = task
    c.train.weight_decay = 0.05
    c.train.label_smoothing = 0.0
    c.train.log_every = 50
    c.eval.batches = 8

    d = c.data  # data.paths: empty = shapes; (root,) = an ImageFolder tree
    d.image_size = v["image_size"]
    d.num_train = 16384  # shapes only: examples drawn for training (then repeated)
    d.num_eval = 256  # shapes only: held-out examples (another random stream)
    d.max_shapes = 1  # shapes per image; the label is the largest one's kind
    d.noise = 0.1  # background texture and pixel noise

    m = c.model
    m.attention = v.get("attention", "softmax")
    m.causal = False  # bidirectional: every patch attends to every patch
    m.rope_theta = 0.0  # no RoPE: learned absolute positions
    m.num_classes = NUM_SHAPE_CLASSES
    # head: "" supervised classifier; "ep" efficient probe; "linear" linear probe (frozen
    # backbone: init_from a supervised run, train.trainable="^probe")
    m.probe = v.get("probe", "")
    m.probe_queries = 8  # EP: M learnable queries
    m.probe_d_out = 1  # EP: W_v maps D -> D / d_out
    c.init_from = v.get("init_from", "")
    if m.probe:
        c.init_from_new = "probe"  # the source run has a classifier, not this probe
        c.train.trainable = "^probe"
        # the backbone's shapes and image size come from the init_from run (trainer.cli
        # inherit_config: an imported ViT's too); the probe and its label set are this config's
        c.init_from_config = "model,-model.probe,-model.num_classes,data.image_size"
    return c


def get_config(name=None):
    v = variant_fields(VARIANTS, name, "tiny", "configs/vit.py")
    c = classification_base("vit", v)
    m = c.model
    m.update({f: v[f] for f in ("patch_size", "num_layers", "d_model", "num_heads", "mlp_dim")})
    m.num_kv_heads = v["num_heads"]
    m.head_dim = 0  # 0: d_model // num_heads
    m.pool = "mean"  # "cls": a learned CLS token feeds the classifier
    m.norm_eps = 0.0  # LayerNorm epsilon; 0: the default (1e-6); Hugging Face's ViT: 1e-12
    # the learned position embeddings start from "normal" (std 0.02) or "sincos2d" (2-D sin-cos)
    m.posemb_init = v.get("posemb_init", "normal")
    for field, value in v.get("model", {}).items():  # a variant's mechanism fields
        m[field] = value
    return finish_config(c)
