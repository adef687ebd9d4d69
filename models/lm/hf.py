"""Hugging Face LlamaForCausalLM -> the LM family (LMTask.hf_importers; `python -m
trainer.convert import-hf`).

Llama 2 / 3 shapes: RMSNorm (rms_norm_eps), SwiGLU (gate_proj = w1, up_proj = w3, down_proj =
w2), RoPE with rope_theta in Hugging Face's half-split layout (the layout of
attention/ops/rope.py, so q and k need no permutation) and the llama3 rope_scaling, grouped-query
attention with an explicit head_dim, a tied or untied head. Linear weights are [out, in] there,
kernels [in, out] here.
"""
from __future__ import annotations

import os

from trainer.cli import load_config
from trainer.config import ConfigError
from trainer.hf import HFImporter

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "lm.py")


def _require(hf: dict, key: str, allowed, what: str):
    value = hf.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"import-hf: config.json {key}={value!r} is not supported for {what}; "
                          f"supported: {', '.join(map(repr, allowed))}")
    return value


def llama_config(hf: dict):
    """The run's config (configs/lm.py's default variant with the checkpoint's shapes)."""
    what = "LlamaForCausalLM"
    _require(hf, "hidden_act", ("silu",), what)
    for key in ("attention_bias", "mlp_bias"):
        _require(hf, key, (False,), what)
    _require(hf, "pretraining_tp", (1,), what)
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
    other = [f"{k}={m.get(k)!r} (Llama: {v!r})" for k, v in
             (("norm", "rmsnorm"), ("mlp", "swiglu"), ("position", "rope"),
              ("attention", "softmax")) if m.get(k, v) != v]
    if other:
        raise ConfigError(f"config.model: {', '.join(other)}")
    out = {"model_type": "llama", "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
           "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
           "head_dim": m.head_dim or m.d_model // m.num_heads, "hidden_act": "silu",
           "rope_theta": m.rope_theta, "rms_norm_eps": m.get("norm_eps") or 1e-6,
           "tie_word_embeddings": bool(m.get("tie_embeddings", False)),
           "max_position_embeddings": max(config.data.seq_len, m.get("rope_original_max_len", 0)
                                          if m.get("rope_scaling") else 0),
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
    t = lambda w: w.T  # noqa: E731  (nn.Linear [out, in] <-> kernel [in, out])
    same = lambda w: w  # noqa: E731
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
