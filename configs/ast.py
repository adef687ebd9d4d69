"""Audio Spectrogram Transformer (models/ast/model.py) and parameter-efficient transfer of a frozen AST.

    python -m trainer.main --config=configs/ast.py:tiny --workdir=runs/ast_tiny
    # PETL: pretrain on half of the classes, then adapt the frozen backbone to the other half
    python -m trainer.main --config=configs/ast.py:pretrain --workdir=runs/ast_pretrain
    python -m trainer.main --config=configs/ast.py:conformer --workdir=runs/ast_conformer
    # real data: an ESC-50 tree (meta/esc50.csv + audio/) or a folder of WAVs per class
    python -m trainer.main --config=configs/ast.py:tiny --workdir=runs/ast_esc50 \
        --config.data.paths=/data/ESC-50 --config.model.num_classes=50 \
        --config.data.clip_seconds=5 --config.data.target_length=500 \
        --config.data.norm_mean=-6.6268077 --config.data.norm_std=5.358466

Variants: tiny (all 8 synthetic classes from scratch); pretrain (the first half: tonal
classes); and one per PETL method adapting runs/ast_pretrain to the other half with the same
budget: full, linear, bitfit, adapter (parallel, MHSA + FFN), adapter_seq (sequential, MHSA +
FFN: Houlsby), conformer (parallel, MHSA + FFN), lora (W_q, W_v), prompt (deep, gated). The synthetic clips (models/ast/audio.py) are written once as an ESC-50 tree under
~/.cache/polyformer and read by the ESC-50 loader. Normalisation statistics of other data:
`python -m trainer.audio stats --source=/data/ESC-50`.
"""
from models.ast import PETL_NEW, PETL_TRAINABLE
from trainer.cli import finish_config
from trainer.config import base_config, schedule_from, variant_fields

# models/ast/audio.py SYNTH_CLASSES, split into what the backbone is pretrained on and the
# transfer task: tonal sounds vs noise-like / modulated ones
PRETRAIN_CLASSES = ("tone_low", "tone_high", "chirp_up", "chirp_down")
TRANSFER_CLASSES = ("am_tone", "white_burst", "pink_burst", "click_train")

_ADAPT = dict(classes=TRANSFER_CLASSES, init_from="runs/ast_pretrain", steps=300, lr=1e-2,
              warmup=20)
VARIANTS = {
    # name: classes, schedule (steps, batch, lr, warmup), PETL fields
    # tiny: ~97% held-out accuracy on the 8 classes in ~1.5 min on a 2-core CPU
    "tiny": dict(classes=(), steps=800, batch=32, lr=2e-3, warmup=50, petl="full"),
    "pretrain": dict(base="tiny", classes=PRETRAIN_CLASSES),
    # one budget (300 steps x 32) for every method; learning rates from sweeps on this task
    # (bench/ast_petl.py): 1e-2 for the adapters, LoRA and BitFit (PETL_AST: 5e-3), 3e-2 for
    # prompts (PETL_AST: 1e-2), the linear probe's best of 1e-3 .. 3e-1, full fine-tuning at
    # the from-scratch rate (PETL_AST's 5e-5 is for an 86M-parameter AST)
    "full": dict(base="tiny", **_ADAPT, petl="full") | dict(lr=2e-3),
    "linear": dict(base="tiny", **_ADAPT, petl="linear") | dict(lr=3e-1),
    "bitfit": dict(base="tiny", **_ADAPT, petl="bitfit"),
    # adapters on the MHSA and the FFN: at this scale both places beat PETL_AST's FFN-only
    # default (parallel adapter 97.5% vs 85.6%, Conformer 95.6% vs 73.8% after 300 steps)
    "adapter": dict(base="tiny", **_ADAPT, petl="adapter", placement="parallel",
                    location="both"),
    "adapter_seq": dict(base="tiny", **_ADAPT, petl="adapter", placement="sequential",
                        location="both"),
    # the Conformer adapter at d / 16 (4 channels): d / 8 on both places is 5.4% of the model
    "conformer": dict(base="tiny", **_ADAPT, petl="conformer", placement="parallel",
                      location="both", reduction=16),
    "lora": dict(base="tiny", **_ADAPT, petl="lora"),
    "prompt": dict(base="tiny", **_ADAPT, petl="prompt") | dict(lr=3e-2),
}


def petl_fields(c, petl: str) -> None:
    """What a PETL method trains and adds to the loaded backbone (models/ast/model.py PETL_*)."""
    c.model.petl = petl
    c.train.trainable = PETL_TRAINABLE[petl]
    c.init_from_new = PETL_NEW.get(petl, "")
    # the transfer task has its own label set: the classifier starts afresh
    c.init_from_skip = "^classifier" if c.init_from else ""
    # the backbone's shapes and spectrogram statistics come from the init_from run (an
    # imported AudioSet AST as much as runs/ast_pretrain); the method, its sizes and the label
    # set are this config's (trainer.cli.inherit_config; --config.<field> overrides win)
    c.init_from_config = ("model,-model.petl,-model.adapter_,-model.conformer_,-model.lora_,"
                          "-model.prompt_,-model.num_classes,-model.classifier_,-model.probe,"
                          "data.num_mel_bins,data.norm_mean,data.norm_std") if c.init_from else ""


def get_config(name=None):
    v = variant_fields(VARIANTS, name, "tiny", "configs/ast.py")
    c = schedule_from(base_config(), v, evals=2)
    c.task = "ast"
    c.train.weight_decay = 0.05
    c.train.label_smoothing = 0.0
    c.train.log_every = 50
    c.eval.batches = 10  # x 32: all 320 clips of the eval fold (8 classes x 40)
    c.init_from = v.get("init_from", "")

    d = c.data  # data.paths: empty = the synthetic clips; (root,) = ESC-50 tree or WAV folders
    d.classes = tuple(v["classes"])  # a subset of the class names, in label order; () = all
    d.sample_rate = 16000
    d.clip_seconds = 1.0
    d.num_mel_bins = 128
    d.target_length = 100  # frames (10 ms): 1 s
    # dataset statistics of the fbank (`python -m trainer.audio stats`); these are the
    # synthetic clips'. AudioSet: -4.2677393 / 4.5689974, ESC-50: -6.6268077 / 5.358466
    d.norm_mean = -2.33
    d.norm_std = 4.11
    # SpecAugment: up to freqm mel bins and timem frames masked per training clip (AST's
    # ESC-50 recipe: 24 and 96). Off for the clean 1 s synthetic clips, where it costs
    # accuracy at this budget (95% vs 97% after 800 steps)
    d.freqm = 0
    d.timem = 0
    d.mixup = 0.0  # probability of mixing a training clip with another (Beta(10, 10) weight)
    d.eval_folds = (5,)  # ESC-50 layout: the held-out fold(s); training uses the others
    d.synthetic_per_fold = 40  # synthetic clips per class and fold (5 folds)
    d.synthetic_seed = 0
    d.embedded_dir = ""  # "": ~/.cache/polyformer/audio_synthetic_<hash of the fields above>

    m = c.model
    m.attention = "softmax"
    m.causal = False
    m.rope_theta = 0.0  # learned absolute positions (adapted in time by init_from)
    m.num_classes = len(d.classes) or 8
    m.probe = ""  # models/vit.py ImageClassifier: the `classifier` head over the pooled tokens
    # a small random head (not zeros): with a zero head no gradient reaches the adapters at
    # step 0, and their first projections would wait two steps to learn
    m.classifier_std = 0.02
    m.probe_queries = 8
    m.probe_d_out = 1
    m.patch_size = 16
    m.fstride = 10
    m.tstride = 10
    m.num_layers = 2
    m.d_model = 64
    m.num_heads = 4
    m.num_kv_heads = 4
    m.head_dim = 0
    m.mlp_dim = 256
    m.pool = "mean"  # PETL_AST's classifier reads the mean of all tokens; "cls_dist": AST's
    m.norm_eps = 0.0  # LayerNorm epsilon; 0: the default (1e-6); Hugging Face's AST: 1e-12
    m.classifier_norm = False  # a LayerNorm before the classifier (AST's own head, HF's too)
    m.adapter_placement = v.get("placement", "parallel")
    m.adapter_location = v.get("location", "ffn")
    m.adapter_reduction = v.get("reduction", 8)  # d -> d / r (PETL_AST: 768 / 96)
    m.conformer_kernel = 7  # PETL_AST: 31 over 1212 tokens; ours has 110
    m.lora_rank = 4
    m.lora_alpha = 8.0
    m.prompt_length = 8
    petl_fields(c, v["petl"])
    return finish_config(c)
