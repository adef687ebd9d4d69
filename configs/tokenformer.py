"""TokenFormer byte-level language model on the embedded corpus (models/tokenformer.py).

    python -m trainer.main --config=configs/tokenformer.py:tiny --workdir=runs/tokenformer_tiny
    python -m trainer.main --config=configs/tokenformer.py:grow --workdir=runs/tokenformer_grow
Variants: tiny (tests, seconds on a CPU), small, and grow: progressive scaling in one command,
a schedule of parameter-token counts (config.stages, trainer/stages.py), each stage initialised
from the previous one's checkpoint with its tokens appended at zero, the optimizer state carried
and the step and learning-rate schedule continuing (one cosine over all stages).

Growing a run by hand works the same way:
    python -m trainer.main --config=configs/tokenformer.py:tiny --workdir=runs/big \
        --config.init_from=runs/tokenformer_tiny --config.model.param_tokens=128 \
        --config.model.ffn_param_tokens=256 --config.init_from_carry=params+optimizer

The Pattention zooms are numbers computed here from the variant's initial token counts and
stored, not derived from the current counts at build time: a run grown from this one (larger
param_tokens / ffn_param_tokens) keeps them, which is what makes growth with zero-initialised
tokens preserve the function (attention/pattention.py).
"""
import ml_collections

from attention.pattention import default_zoom
from configs.lm import byte_lm_base
from trainer.cli import finish_config
from trainer.config import variant_fields

VARIANTS = {
    # name: layers, d_model, heads, parameter tokens (q/k/v/o, FFN), seq_len, global batch,
    # steps, lr, warmup
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, param_tokens=64, ffn_param_tokens=128,
                 seq_len=64, batch=8, steps=20, lr=3e-3, warmup=2),
    "small": dict(num_layers=6, d_model=512, num_heads=8, param_tokens=512,
                  ffn_param_tokens=2048, seq_len=512, batch=16, steps=5000, lr=1e-3,
                  warmup=200),
    # stages: (param_tokens, ffn_param_tokens, train until this step); the first stage's counts
    # are the model's and fix the zooms
    "grow": dict(num_layers=2, d_model=128, num_heads=4, seq_len=128, batch=16, steps=600,
                 lr=3e-3, warmup=20, stages=((32, 128, 200), (64, 256, 400), (128, 512, 600))),
}


def get_config(variant=None):
    variant = variant or "tiny"
    v = variant_fields(VARIANTS, variant, "tiny", "configs/tokenformer.py")
    stages = v.pop("stages", ())
    if stages:
        v["param_tokens"], v["ffn_param_tokens"] = stages[0][:2]
    c = byte_lm_base("tokenformer", v)

    m = c.model
    m.attention = "softmax"  # token-token mixing: causal softmax attention
    m.vocab_size = 256  # bytes
    m.num_layers = v["num_layers"]
    m.d_model = v["d_model"]
    m.num_heads = v["num_heads"]
    m.rope_theta = 10000.0  # 0: no RoPE
    m.param_tokens = v["param_tokens"]  # per q, k, v and output Pattention
    m.ffn_param_tokens = v["ffn_param_tokens"]  # the FFN Pattention
    m.pattention_norm = "l2_norm_gelu"  # or gelu_l2_norm, softmax (attention/pattention.py)
    # fixed at the initial counts (sqrt(n) for l2_norm_gelu): growth keeps these numbers
    m.pattention_zoom = default_zoom(m.pattention_norm, m.param_tokens)
    m.ffn_pattention_zoom = default_zoom(m.pattention_norm, m.ffn_param_tokens)

    if stages:
        c.stages = tuple({"model.param_tokens": n, "model.ffn_param_tokens": n_ffn,
                          "train.steps": until} for n, n_ffn, until in stages)
        c.init_from_carry = "params+optimizer+step"  # one run that grows, not a restart
        c.train.schedule_steps = stages[-1][2]  # one warmup + cosine over all stages
        c.eval.every = 0  # each stage evaluates at its end (and checkpoints every quarter)

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "def "
    c.sample.max_new_tokens = {"tiny": 32, "grow": 64}.get(variant, 200)
    c.sample.temperature = 0.7
    c.sample.top_k = 40
    return finish_config(c)
