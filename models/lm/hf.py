"""Hugging Face LlamaForCausalLM and GPT2LMHeadModel <-> the LM family (LMTask.hf_importers;
`python -m trainer.convert import-hf` / `export-hf`).

Llama 2 / 3 shapes: RMSNorm (rms_norm_eps), SwiGLU (gate_proj = w1, up_proj = w3, down_proj =
w2), RoPE with rope_theta in Hugging Face's half-split layout (the layout of
attention/ops/rope.py, so q and k need no permutation) and the llama3 rope_scaling, grouped-query
attention with an explicit head_dim, a tied or untied head. Linear weights are [out, in] there,
kernels [in, out] here.

GPT-2 shapes (Radford et al. 2019; the names and layouts of transformers'
models/gpt2/modeling_gpt2.py): LayerNorm with bias (layer_norm_epsilon) before attention (ln_1)
and MLP (ln_2) and at the end (ln_f), the tanh GELU MLP with biases (c_fc, c_proj), multi-head
attention with biases whose q, k, v projections are one fused c_attn, learned absolute positions
(wpe, n_positions), a tied head by default. Its Conv1D weights are [in, out], our kernel layout
already; c_attn's weight [d, 3d] and bias [3d] hold q, k, v in that order on the last axis.
Dropout (resid/embd/attn_pdrop) is not modelled: an imported run trains without it.
"""
from __future__ import annotations

import os

from trainer.cli import apply_overrides, load_config
from trainer.config import ConfigError
from trainer.hf import HFImporter, require, same, transpose

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "lm.py")


def _other(m, table, what: str) -> None:
    """ConfigError naming the config.model fields (field, its default, what `what` needs) whose
    value differs."""
    other = [f"{k}={m.get(k, default)!r} ({what}: {v!r})" for k, default, v in table
             if m.get(k, default) != v]
    if other:
        raise ConfigError(f"config.model: {', '.join(other)}")


def llama_config(hf: dict):
    """The run's config (configs/lm.py's default variant with the checkpoint's shapes)."""
    what = "LlamaForCausalLM"
    require(hf, "hidden_act", ("silu",), what)
    for key in ("attention_bias", "mlp_bias"):
        require(hf, key, (False,), what)
    require(hf, "pretraining_tp", (1,), what)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    overrides = [
        f"model.vocab_size={hf['vocab_size']}", f"model.d_model={hf['hidden_size']}",
        f"model.num_layers={hf['num_hidden_layers']}", f"model.num_heads={heads}",
        f"model.num_kv_heads={hf.get('num_key_value_heads') or heads}",
        f"model.head_dim={head_dim}", f"model.mlp_dim={hf['intermediate_size']}",
        f"model.rope_theta={float(hf.get('rope_theta', 10000.0))}",
        f"model.norm_eps={float(hf.get('rms_norm_eps', 1e-6))}",
        f"model.tie_embeddings={bool(hf.get('tie_word_embeddings', False))}",
        "model.norm=rmsnorm", "model.mlp=swiglu", "model.position=rope", "model.attention=softmax",
    ]
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        overrides += ["model.rope_scaling=llama3",
                      f"model.rope_scaling_factor={float(scaling['factor'])}",
                      f"model.rope_low_freq_factor={float(scaling['low_freq_factor'])}",
                      f"model.rope_high_freq_factor={float(scaling['high_freq_factor'])}",
                      f"model.rope_original_max_len="
                      f"{int(scaling['original_max_position_embeddings'])}"]
    elif kind != "default":
        raise ConfigError(f"import-hf: config.json rope_scaling type {kind!r} is not supported; "
                          "supported: none, 'llama3'")
    return load_config(f"{CONFIG_FILE}:default", overrides)


def llama_hf_config(config) -> dict:
    """A run's config.json as LlamaForCausalLM (ConfigError when its model is not Llama's)."""
    m = config.model
    _other(m, (("norm", "rmsnorm", "rmsnorm"), ("mlp", "swiglu", "swiglu"),
               ("position", "rope", "rope"), ("attention", "softmax", "softmax"),
               ("softmax_bias", False, False), ("mlp_bias", False, False)), "Llama")
    out = {"model_type": "llama", "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
           "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
           "head_dim": m.head_dim or m.d_model // m.num_heads, "hidden_act": "silu",
           "rope_theta": m.rope_theta, "rms_norm_eps": m.get("norm_eps") or 1e-6,
           "tie_word_embeddings": bool(m.get("tie_embeddings", False)),
           # llama3 scaling stretches the original context by its factor (Llama 3.1: 8k x 8)
           "max_position_embeddings": max(config.data.seq_len, int(
               m.rope_original_max_len * m.rope_scaling_factor) if m.get("rope_scaling") else 0),
           "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
           "rope_scaling": None}
    if m.get("rope_scaling") == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                               "low_freq_factor": m.rope_low_freq_factor,
                               "high_freq_factor": m.rope_high_freq_factor,
                               "original_max_position_embeddings": m.rope_original_max_len}
    return out


def llama_tensors(config) -> dict:
    """{our parameter name: (HF tensor name, to ours, to HF)}."""
    t = transpose
    out = {"embed/embedding": ("model.embed_tokens.weight", same, same),
           "final_norm/scale": ("model.norm.weight", same, same)}
    if not config.model.tie_embeddings:
        out["lm_head/kernel"] = ("lm_head.weight", t, t)
    for i in range(config.model.num_layers):
        hf = f"model.layers.{i}."
        ours = f"blocks/{i}/"
        for proj in ("q", "k", "v", "o"):
            out[f"{ours}attn/{proj}_proj/kernel"] = (f"{hf}self_attn.{proj}_proj.weight", t, t)
        for w, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{ours}mlp/{w}/kernel"] = (f"{hf}mlp.{name}.weight", t, t)
        out[f"{ours}attn_norm/scale"] = (f"{hf}input_layernorm.weight", same, same)
        out[f"{ours}mlp_norm/scale"] = (f"{hf}post_attention_layernorm.weight", same, same)
    return out


LLAMA = HFImporter(config=llama_config, hf_config=llama_hf_config, tensors=llama_tensors,
                   # older checkpoints store the rotary frequencies; a tied head may be saved too
                   ignored=("rotary_emb.inv_freq", "lm_head.weight"))


# ----------------------------------------------------------------------------- GPT-2
# transformers' activation names of the tanh GELU, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715
# x^3))) (models/lm/model.py GeluMLP; "gelu", the erf form, is another function)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")


def _int(hf: dict, key: str, what: str) -> int:
    value = hf.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"import-hf: config.json {key}={value!r} is not supported for {what}; "
                          "supported: a positive integer")
    return value


def gpt2_config(hf: dict):
    """The run's config (configs/lm.py's default variant with the checkpoint's shapes;
    data.seq_len at most n_positions)."""
    what = "GPT2LMHeadModel"
    require(hf, "activation_function", GELU_TANH, what)
    require(hf, "scale_attn_weights", (True,), what)
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                "add_cross_attention"):
        require(hf, key, (False,), what)
    vocab, d, layers, heads, positions = (_int(hf, k, what) for k in (
        "vocab_size", "n_embd", "n_layer", "n_head", "n_positions"))
    if d % heads:
        raise ConfigError(f"import-hf: config.json n_embd={d} is not divisible by n_head={heads}; "
                          f"supported: n_embd a multiple of n_head")
    inner = hf.get("n_inner")
    if inner is not None:
        inner = _int(hf, "n_inner", f"{what} (or null: 4 * n_embd)")
    config = load_config(f"{CONFIG_FILE}:default", [
        f"model.vocab_size={vocab}", f"model.d_model={d}", f"model.num_layers={layers}",
        f"model.num_heads={heads}", f"model.num_kv_heads={heads}", "model.head_dim=0",
        f"model.mlp_dim={inner or 4 * d}", "model.rope_theta=0.0",
        f"model.norm_eps={float(hf.get('layer_norm_epsilon', 1e-5))}",
        f"model.tie_embeddings={bool(hf.get('tie_word_embeddings', True))}",
        "model.norm=layernorm", "model.mlp=gelu", "model.mlp_bias=True",
        "model.position=learned", f"model.max_len={positions}", "model.attention=softmax",
        "model.softmax_bias=True"])
    if config.data.seq_len > positions:
        config = apply_overrides(config, [f"data.seq_len={positions}"])
    return config


def gpt2_hf_config(config) -> dict:
    """A run's config.json as GPT2LMHeadModel (ConfigError naming the fields when its model is
    not GPT-2's)."""
    m = config.model
    _other(m, (("norm", "rmsnorm", "layernorm"), ("mlp", "swiglu", "gelu"),
               ("position", "rope", "learned"), ("attention", "softmax", "softmax"),
               ("softmax_bias", False, True), ("mlp_bias", False, True),
               ("num_kv_heads", m.num_kv_heads, m.num_heads), ("rope_theta", 0.0, 0.0),
               ("causal", True, True)), "GPT-2")
    if m.head_dim and m.head_dim * m.num_heads != m.d_model:
        raise ConfigError(f"config.model: head_dim={m.head_dim} (GPT-2: d_model / num_heads = "
                          f"{m.d_model / m.num_heads:g}, or 0)")
    return {"model_type": "gpt2", "vocab_size": m.vocab_size, "n_positions": m.max_len,
            "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads,
            "n_inner": m.mlp_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": m.get("norm_eps") or 1e-5,
            "tie_word_embeddings": bool(m.get("tie_embeddings", False)),
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False,
            # the run has no dropout
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def gpt2_tensors(config) -> dict:
    """{our parameter name: (HF tensor name, to ours, to HF)}; q, k, v share c_attn
    (trainer/hf.py HFImporter: slices of its last axis, in this order)."""
    t = transpose  # (the untied head is an nn.Linear, [out, in]; Conv1D [in, out] is ours)
    out = {"embed/embedding": ("transformer.wte.weight", same, same),
           "pos_embed/embedding": ("transformer.wpe.weight", same, same),
           "final_norm/scale": ("transformer.ln_f.weight", same, same),
           "final_norm/bias": ("transformer.ln_f.bias", same, same)}
    if not config.model.tie_embeddings:
        out["lm_head/kernel"] = ("lm_head.weight", t, t)
    for i in range(config.model.num_layers):
        hf, ours = f"transformer.h.{i}.", f"blocks/{i}/"
        layers = [(f"attn/{p}_proj", "attn.c_attn") for p in "qkv"] + [
            ("attn/o_proj", "attn.c_proj"), ("mlp/fc", "mlp.c_fc"), ("mlp/proj", "mlp.c_proj")]
        for layer, name in layers:
            out[f"{ours}{layer}/kernel"] = (f"{hf}{name}.weight", same, same)
            out[f"{ours}{layer}/bias"] = (f"{hf}{name}.bias", same, same)
        for norm, name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{ours}{norm}/scale"] = (f"{hf}{name}.weight", same, same)
            out[f"{ours}{norm}/bias"] = (f"{hf}{name}.bias", same, same)
    return out


GPT2 = HFImporter(config=gpt2_config, hf_config=gpt2_hf_config, tensors=gpt2_tensors,
                  # older checkpoints store each layer's causal mask; a tied head may be saved too
                  ignored=(".attn.bias", ".attn.masked_bias", "lm_head.weight"),
                  base_prefix="transformer.")
