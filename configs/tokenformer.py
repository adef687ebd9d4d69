"""TokenFormer byte-level language model on the embedded corpus (models/tokenformer.py).

    python -m trainer.main --config=configs/tokenformer.py:tiny --workdir=runs/tokenformer_tiny
Variants: tiny (tests, seconds on a CPU), small.

The Pattention zooms are numbers computed here from the variant's initial token counts and
stored, not derived from the current counts at build time: a run grown from this one (larger
param_tokens / ffn_param_tokens) keeps them, which is what makes growth with zero-initialised
tokens preserve the function (attention/pattention.py).
"""
from configs.lm import byte_lm_base
from trainer.config import ConfigError

VARIANTS = {
    # name: layers, d_model, heads, parameter tokens (q/k/v/o, FFN), seq_len, global batch,
    # steps, lr, warmup
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, param_tokens=64, ffn_param_tokens=128,
                 seq_len=64, batch=8, steps=20, lr=3e-3, warmup=2),
    "small": dict(num_layers=6, d_model=512, num_heads=8, param_tokens=512,
                  ffn_param_tokens=2048, seq_len=512, batch=16, steps=5000, lr=1e-3,
                  warmup=200),
}


def get_config(variant=None):
    import ml_collections

    from attention.pattention import default_zoom

    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ConfigError(f"configs/tokenformer.py: unknown variant {variant!r}; known variants: "
                          f"{', '.join(VARIANTS)}")
    v = VARIANTS[variant]
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

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 32 if variant == "tiny" else 200
    c.sample.temperature = 0.7
    c.sample.top_k = 40
    return c
