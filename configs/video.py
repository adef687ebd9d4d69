"""Video classification: an image ViT over the frames of a clip with STDHA (models/video.py).

    python -m trainer.main --config=configs/video.py:tiny --workdir=runs/video_tiny
    python -m trainer.main --config=configs/video.py:frame_avg --workdir=runs/video_frame_avg
Variants: tiny (a 2-layer ViT on 4-frame 32 px clips of the embedded moving shapes, STDHA:
key/value head 1 from the previous frame, head 2 from the next); frame_avg: the same backbone
with plain softmax attention, each frame on its own and the classifier averaging the frames
(the baseline; order-blind, so at most 50% on this data, chance 12.5%). A folder of clips
(root/<class>/<clip>/<frame>.jpg) instead:
    --config.data.paths=/path/to/clips --config.model.num_classes=<classes>
from_vit: an image ViT run adapted to video at zero parameter cost (its backbone loads
unchanged, the classifier is new; train configs/vit.py:tiny into runs/vit_tiny first):
    python -m trainer.main --config=configs/video.py:from_vit --workdir=runs/video_from_vit
    ... --config.init_from=runs/vit_b16   # a Hugging Face ViT from trainer.convert import-hf
"""
from configs.vit import classification_base
from trainer.cli import finish_config
from trainer.config import variant_fields

VARIANTS = {
    # name: (image size, patch, frames, layers, d_model, heads, MLP, global batch, steps, lr,
    # warmup)
    "tiny": dict(image_size=32, patch_size=8, num_frames=4, num_layers=2, d_model=64,
                 num_heads=4, mlp_dim=128, batch=32, steps=3000, lr=2e-3, warmup=50,
                 attention="stdha"),
    "frame_avg": dict(base="tiny", attention="softmax"),
    # ZeroI2V's use: an image ViT run (default runs/vit_tiny, configs/vit.py:tiny; or a Hugging
    # Face ViT imported with trainer.convert) adapted to clips; its backbone's shapes, pool and
    # image size come from that run, its parameters load unchanged, the classifier is new
    "from_vit": dict(base="tiny", init_from="runs/vit_tiny", steps=1500),
}


def get_config(name=None):
    v = variant_fields(VARIANTS, name, "tiny", "configs/video.py")
    c = classification_base("video", v)
    d, m = c.data, c.model
    d.num_frames = v["num_frames"]  # F frames per clip (the attention layers' num_frames)
    d.speed = 0.08  # moving shapes: the slow classes' speed, a fraction of the image per frame
    d.noise = 0.05  # moving shapes: background texture and pixel noise
    d.flip = False  # clip folders: horizontal flips in training (they turn left into right)
    d.num_train = 8192  # moving shapes: clips drawn for training (then repeated)
    m.num_classes = 8  # models/video.py MOTION_CLASSES (checked against the data)
    m.update({f: v[f] for f in ("patch_size", "num_layers", "d_model", "num_heads", "mlp_dim")})
    m.num_kv_heads = v["num_heads"]
    m.head_dim = 0  # 0: d_model // num_heads
    m.pool = "mean"  # each frame's mean token; the clip's: their mean over frames
    m.norm_eps = 0.0
    # 2-D sin-cos start for the learned positions: where the shape is must be readable from
    # step 0, or the tiny model sits at chance for thousands of steps (README, video)
    m.posemb_init = "sincos2d"
    m.classifier_std = 0.0  # the classifier's initial std; 0: zeros
    if m.attention == "stdha":  # ZeroI2V: head 1 from frame t - 1, head 2 from t + 1
        m.stdha_shift = ("1:-1", "2:1")
    if c.init_from:  # classification_base set it from the variant
        # the source's head classifies images: skip it whatever its shape (a ViTModel import,
        # a probe run: none at all), so this run's classifier starts new
        c.init_from_skip = "^classifier"
        c.init_from_new = "classifier"
        # the backbone as the source built it; attention (stdha), the STDHA fields and the
        # label set stay this config's
        c.init_from_config = ("model,-model.attention,-model.stdha_,-model.num_classes,"
                              "-model.probe,-model.classifier_,data.image_size")
    return finish_config(c)
