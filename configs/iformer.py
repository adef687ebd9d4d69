"""iFormer (Inception Transformer) image classification on shapes (models/iformer.py), and
efficient probing of its frozen backbone.

    python -m trainer.main --config=configs/iformer.py:tiny --workdir=runs/iformer_tiny
    python -m trainer.main --config=configs/iformer.py:probe_ep --workdir=runs/iformer_probe_ep
Variants: tiny (3 stages on 32 px shapes, ~27% held-out accuracy, about a minute on a 2-core
CPU, a third of it compiling); probe_ep and probe_linear: an EP / linear probe on the frozen
backbone of runs/iformer_tiny (train tiny first). ImageFolder data:
--config.data.paths=/path/to/folder --config.model.num_classes=<n>.

The tiny model keeps iFormer-S's frequency ramp (PAPERS.md): the share of each block's channels
given to attention grows with depth (1/3, 1/2, 2/3 -> 5/6 here; 1/3 ... 11/12 in iFormer-S),
attention runs on 2x average-pooled maps in the early stages and at full resolution late.
"""
from configs.vit import classification_base
from trainer.cli import finish_config
from trainer.config import variant_fields

VARIANTS = {
    # name: per-stage channels, blocks, heads (head_dim 16), pooling; per-block attention heads
    "tiny": dict(image_size=32, dims=(48, 64, 96), depths=(1, 1, 2), num_heads=(3, 4, 6),
                 attention_heads=(1, 2, 4, 5), pool=(2, 2, 1), batch=32, steps=500, lr=1e-3,
                 warmup=50),
    "probe_ep": dict(base="tiny", probe="ep", init_from="runs/iformer_tiny", steps=150,
                     lr=3e-3, warmup=10),
    "probe_linear": dict(base="tiny", probe="linear", init_from="runs/iformer_tiny",
                         steps=150, lr=3e-3, warmup=10),
}


def get_config(name=None):
    v = variant_fields(VARIANTS, name, "tiny", "configs/iformer.py")
    c = classification_base("iformer", v)
    m = c.model
    # per stage: channels, blocks, heads and the low-frequency mixer's average pooling; per
    # block: attention heads (C_l / head_dim)
    m.update({f: v[f] for f in ("dims", "depths", "num_heads", "attention_heads", "pool")})
    m.mlp_ratio = 4.0
    return finish_config(c)
