"""Byte-level language model on the embedded corpus (the Python stdlib's source files).

    python -m trainer.main --config=configs/lm.py:tiny --workdir=runs/tiny
Variants: tiny (tests, seconds), default (`make train`, ~5 minutes on a 2-core CPU), small;
gla_tiny and gla: the tiny and default LMs with gated linear attention; moh_tiny and
complexformer_tiny: the tiny LM with Mixture-of-Head / ComplexFormer attention;
hedgehog_distill then hedgehog_finetune: converting the default softmax LM (runs/lm, from
`make train`) to Hedgehog; finetune (LoRA) and finetune_full: an imported or trained LM
(--config.init_from=RUN_DIR: its shapes and tokenizer) on your text (--config.data.paths); long: 2k-byte context for the sparse prefill methods; 1b, 8b,
gla_1b, gla_8b: pod-scale shapes for planning (`--dry_run --topology=v5p:4x4x4`, README
"Planning a pod run").
"""
import ml_collections

from trainer.cli import finish_config
from trainer.config import base_config, schedule_from, variant_fields

VARIANTS = {
    # name: (layers, d_model, heads, kv_heads, seq_len, global batch, steps, lr, warmup)
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, seq_len=64, batch=8,
                 steps=20, lr=3e-3, warmup=2),
    # default: 3 wide layers rather than 4 narrow ones: on a 2-core CPU, 512-wide matmuls and
    # 128-dim heads run at ~40% of the f32 matmul peak, 256-wide ones at ~30%
    "default": dict(num_layers=3, d_model=512, num_heads=4, num_kv_heads=2, seq_len=256, batch=16,
                    steps=200, lr=2e-3, warmup=20),
    # gated linear attention (attention/gla.py) in the same LMs
    "gla_tiny": dict(base="tiny", attention="gla"),
    "gla": dict(base="default", attention="gla"),
    # head-level / positional mechanisms in the tiny LM (PAPERS.md): Mixture-of-Head attention
    # (attention/moh.py; 1 shared + top-2 of 3 routed heads) and ComplexFormer's complex
    # multi-head attention (attention/complexformer.py)
    "moh_tiny": dict(base="tiny", attention="moh"),
    "complexformer_tiny": dict(base="tiny", attention="complexformer"),
    # Hedgehog conversion (PAPERS.md): from the softmax LM of `make train` (runs/lm), 1) train
    # only the feature maps to mimic its attention (distillation loss), 2) fine-tune everything
    "hedgehog_distill": dict(base="default", attention="hedgehog", distill=True, steps=100,
                             lr=1e-2, warmup=10, init_from="runs/lm", trainable="feature_map"),
    "hedgehog_finetune": dict(base="default", attention="hedgehog", steps=200, lr=5e-4,
                              warmup=10, init_from="runs/hedgehog_distill"),
    # long context (2k bytes): the softmax LM the training-free sparse prefill methods (HiP,
    # FlexPrefill, DHSA, Landmark retrieval) are measured on by bench/sparse.py
    "long": dict(num_layers=2, d_model=256, num_heads=4, num_kv_heads=2, seq_len=2048, batch=4,
                 steps=200, lr=2e-3, warmup=20),
    "small": dict(num_layers=6, d_model=512, num_heads=8, num_kv_heads=4, seq_len=512, batch=16,
                  steps=5000, lr=1e-3, warmup=200),
    # pod scale (README "Planning a pod run"; plan with --dry_run --topology=v5p:4x4x4): bf16
    # compute, rematerialised blocks, FSDP over every chip, 1M-token batches of 4k sequences.
    # 1b: Llama-3.2-1B shapes with an untied 32k vocabulary (1.14B parameters); 8b: Llama-3-8B
    # (8.03B). gla_*: the same with GLA layers at fla's head counts (4 and 8 heads: 256-dim keys,
    # 512-dim values; fla's gla-1.3B uses 4).
    "1b": dict(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, mlp_dim=8192,
               vocab=32768, seq_len=4096, batch=256, steps=100_000, lr=3e-4, warmup=2000,
               pod=True),
    "8b": dict(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, mlp_dim=14336,
               vocab=128256, seq_len=4096, batch=256, steps=100_000, lr=3e-4, warmup=2000,
               pod=True),
    # the GPT of ../shared/peers (torch_gpt.py / jax_gpt.py; bench/peer.py times them side by
    # side): LayerNorm, tanh-GELU 4x MLP, learned positions, tied head, MHA, AdamW 3e-4 without
    # clipping or schedule
    "peer_a": dict(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, seq_len=512, batch=8,
                   steps=100, lr=3e-4, warmup=0, gpt2=True),
    "peer_b": dict(num_layers=6, d_model=512, num_heads=8, num_kv_heads=8, seq_len=256, batch=8,
                   steps=100, lr=3e-4, warmup=0, gpt2=True),
    # fine-tuning an imported (or any trained) LM on your text with its tokenizer: the model's
    # shapes and data.tokenizer come from --config.init_from=RUN_DIR (config.init_from_config);
    # finetune: LoRA rank 8 on W_q, W_v (only lora_a / lora_b train); finetune_full: every weight
    "finetune": dict(base="default", finetune=True, lora_rank=8, steps=200, lr=2e-4, warmup=10,
                     trainable="lora_"),
    "finetune_full": dict(base="default", finetune=True, steps=200, lr=2e-5, warmup=10),
    "gla_1b": dict(base="1b", attention="gla", num_heads=4, num_kv_heads=4),
    "gla_8b": dict(base="8b", attention="gla", num_heads=8, num_kv_heads=8),
}


def byte_lm_base(task: str, v: dict):
    """base_config() with the schedule of a byte-level LM variant (steps, batch, lr, warmup,
    seq_len; eval and checkpoints every quarter); configs/tokenformer.py shares it."""
    c = schedule_from(base_config(), v)
    c.task = task
    c.eval.batches = 8
    c.data.seq_len = v["seq_len"]
    # bytes | a Hugging Face tokenizer.json | a SentencePiece .model (trainer/tokenizer.py);
    # model.vocab_size must hold its vocabulary
    c.data.tokenizer = "bytes"
    return c


def get_config(variant=None):
    variant = variant or "default"
    # a mechanism variant names its base variant: the base's shapes and schedule
    v = variant_fields(VARIANTS, variant, "default", "configs/lm.py")
    c = byte_lm_base("lm", v)

    m = c.model
    m.attention = v.get("attention", "softmax")
    m.vocab_size = v.get("vocab", 256)  # bytes (a pod config's larger vocabulary: shapes only)
    m.num_layers = v["num_layers"]
    m.d_model = v["d_model"]
    m.num_heads = v["num_heads"]
    m.num_kv_heads = v["num_kv_heads"]
    m.head_dim = 0  # 0: d_model // num_heads
    # SwiGLU at ~ the 4x MLP's parameters, rounded to a multiple of 128 (TPU lanes / MXU tiles)
    m.mlp_dim = v.get("mlp_dim", max(int(8 / 3 * v["d_model"] / 128 + 0.5), 1) * 128)
    m.rope_theta = 10000.0
    # Llama 3.1's RoPE frequency scaling (attention/ops/rope.py): "" off, "llama3" with these
    m.rope_scaling = ""
    m.rope_scaling_factor = 8.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_max_len = 8192
    m.norm_eps = 0.0  # 0: the norm's default (RMSNorm 1e-6, LayerNorm 1e-5); Llama 3: 1e-5
    # architecture switches (models/lm/model.py): Llama style by default, GPT-2 style for the peers
    m.norm = "rmsnorm"
    m.mlp = "swiglu"
    m.mlp_bias = False  # biases on the MLP's linear layers (GPT-2 checkpoints have them)
    m.position = "rope"
    m.max_len = 0  # learned positions only: how many
    m.tie_embeddings = False
    # LoRA (Hu et al. 2022) on the attention projections: rank 0 = off; the finetune variant
    # sets it with train.trainable="lora_" (only the low-rank updates train)
    m.lora_rank = v.get("lora_rank", 0)
    m.lora_alpha = 16.0
    m.lora_targets = ("q", "v")
    if v.get("gpt2"):
        m.norm, m.mlp, m.position, m.rope_theta = "layernorm", "gelu", "learned", 0.0
        m.max_len, m.tie_embeddings, m.mlp_dim = v["seq_len"], True, 4 * v["d_model"]
        c.train.grad_clip_norm = 0.0
        c.train.min_lr_ratio = 1.0  # constant learning rate
        c.train.b1, c.train.b2, c.train.eps, c.train.weight_decay = 0.9, 0.95, 1e-8, 0.1
    if m.attention == "hedgehog":  # attention/hedgehog.py: distillation mode (its other
        m.hedgehog_distill = bool(v.get("distill", False))  # options: finish_config)
    c.init_from = v.get("init_from", "")
    if v.get("distill"):
        c.init_from_new = "feature_map"  # the softmax source has no feature maps
    c.train.trainable = v.get("trainable", "")
    if v.get("finetune"):
        c.init_from_config = "model,-model.lora_,data.tokenizer"
        c.init_from_new = "lora_" if m.lora_rank else ""
        c.train.weight_decay = 0.0
    if v.get("pod"):
        c.train.compute_dtype = "bfloat16"
        c.train.remat = True
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.checkpoint.every = 1000
        c.eval.every = 1000
    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 32 if variant.endswith("tiny") else 200
    c.sample.temperature = 0.7
    c.sample.top_k = 40
    return finish_config(c)
