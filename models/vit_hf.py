"""Hugging Face ViTForImageClassification and ViTModel <-> the vit family (ViTTask.hf_importers;
`python -m trainer.convert import-hf` / `export-hf`), and the encoder-layer map the AST family's
importer shares (models/ast/hf.py).

The mapping follows transformers' models/vit/modeling_vit.py (ViTEmbeddings, ViTLayer, ViTModel,
ViTForImageClassification): a p x p stride-p Conv2d patch embedding, a CLS token first, learned
position embeddings for the 1 + N tokens, pre-norm layers (layernorm_before -> q/k/v with biases
-> attention.output.dense; layernorm_after -> intermediate.dense -> exact GELU ->
output.dense), a final LayerNorm, and ViTForImageClassification's Linear on the CLS token. Here:
model.pool="cls", model.softmax_bias=True (the q/k/v/o biases), model.norm_eps=layer_norm_eps
(1e-12 in every Hugging Face ViT), the Mlp's exact GELU. Linear weights are [out, in] there,
kernels [in, out] here; the conv weight [D, C, p, p] is the patch_embed kernel
[(p_y, p_x, C), D] of models/vit.py `patchify`.

ViTModel is the backbone alone: its pooler (Linear + tanh on the CLS token, present when saved
with add_pooling_layer=True) has no counterpart here and is ignored on import; export writes
none (load the export with `ViTModel.from_pretrained(dir, add_pooling_layer=False)`, or
transformers initialises a fresh pooler and warns). Imported, our classifier keeps its initial
(zero) values; exported, our classifier or probe is left out (`--architecture=ViTModel`).

Inputs: transformers takes pixel_values [B, 3, S, S] (NCHW) normalised with the checkpoint's
preprocessor_config.json image_mean / image_std; the vit family takes images [B, S, S, 3]
(NHWC) as (pixel / 255 - 0.5) / 0.5 (models/images.py), which is the google/vit-* checkpoints'
normalisation (image_mean = image_std = 0.5). The config holds no other mean / std: a
checkpoint normalised otherwise (e.g. ImageNet's 0.485 / 0.229 statistics) sees shifted inputs
until fine-tuned. transformers' processor resizes the whole image to S x S; the ImageFolder
loader's eval split crops the centre square first (the same on square images).
data.image_size = image_size, model.patch_size = patch_size.
"""
from __future__ import annotations

import os

from trainer.cli import load_config
from trainer.config import ConfigError
from trainer.hf import HFImporter, linear_map, norm_map, require, same, transpose

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "vit.py")
# transformers' ViTConfig defaults (what a key absent from config.json means)
VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12,
                    image_size=224, patch_size=16, num_channels=3, qkv_bias=True)


def num_labels(hf: dict) -> int:
    """The classifier's outputs: id2label's length (transformers' default: 2)."""
    return len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))


def encoder_overrides(hf: dict, what: str, defaults: dict) -> list[str]:
    """config.model fields of a transformers ViT-style encoder (ViT, AST): width, depth, heads,
    MLP, LayerNorm epsilon, softmax attention with q/k/v/o biases, bidirectional, no RoPE."""
    get = lambda key: hf.get(key, defaults[key])  # noqa: E731
    require(hf, "hidden_act", ("gelu",), what, defaults)  # exact (erf) GELU, as models' Mlp
    require(hf, "qkv_bias", (True,), what, defaults)  # softmax_bias: q/k/v/o all or none
    d, heads = get("hidden_size"), get("num_attention_heads")
    if d % heads:
        raise ConfigError(f"import-hf: config.json hidden_size={d} is not a multiple of "
                          f"num_attention_heads={heads} ({what} needs it)")
    return [f"model.d_model={d}", f"model.num_layers={get('num_hidden_layers')}",
            f"model.num_heads={heads}", f"model.num_kv_heads={heads}", "model.head_dim=0",
            f"model.mlp_dim={get('intermediate_size')}",
            f"model.norm_eps={float(get('layer_norm_eps'))}", "model.attention=softmax",
            "model.softmax_bias=True", "model.causal=False", "model.rope_theta=0.0"]


def encoder_problems(m, arch: str) -> list[str]:
    """The config.model fields of a run that a transformers ViT-style encoder cannot express."""
    out = [f"{k}={m.get(k)!r} ({arch}: {v!r})" for k, v in
           (("attention", "softmax"), ("softmax_bias", True), ("causal", False),
            ("rope_theta", 0.0)) if m.get(k) != v]
    if m.num_kv_heads != m.num_heads:
        out.append(f"num_kv_heads={m.num_kv_heads} ({arch}: num_heads={m.num_heads})")
    if m.d_model % m.num_heads or m.head_dim not in (0, m.d_model // m.num_heads):
        out.append(f"head_dim={m.head_dim} with d_model={m.d_model}, num_heads={m.num_heads} "
                   f"({arch}: d_model / num_heads)")
    return out


def encoder_hf_config(m) -> dict:
    """The config.json keys of a ViT-style encoder from config.model."""
    return {"hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "intermediate_size": m.mlp_dim,
            "hidden_act": "gelu", "layer_norm_eps": m.get("norm_eps") or 1e-6, "qkv_bias": True,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02}


def labels(num_classes: int, names=()) -> dict:
    names = list(names) if len(names) == num_classes else [f"LABEL_{i}" for i in
                                                           range(num_classes)]
    return {"id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}}


def encoder_layers(num_layers: int, prefix: str) -> dict:
    """{our parameter name: (HF tensor, to ours, to HF)} of the encoder layers (transformers'
    ViTLayer / ASTLayer: encoder.layer.{i}.*) of models/vit.py / models/ast/model.py Block."""
    out = {}
    for i in range(num_layers):
        hf, ours = f"{prefix}encoder.layer.{i}.", f"backbone/blocks/{i}/"
        for proj, name in (("q", "attention.attention.query"), ("k", "attention.attention.key"),
                           ("v", "attention.attention.value"), ("o", "attention.output.dense")):
            out[f"{ours}attn/{proj}_proj/kernel"] = (f"{hf}{name}.weight", transpose, transpose)
            out[f"{ours}attn/{proj}_proj/bias"] = (f"{hf}{name}.bias", same, same)
        for fc, name in (("fc1", "intermediate.dense"), ("fc2", "output.dense")):
            out[f"{ours}mlp/{fc}/kernel"] = (f"{hf}{name}.weight", transpose, transpose)
            out[f"{ours}mlp/{fc}/bias"] = (f"{hf}{name}.bias", same, same)
        for norm, name in (("attn_norm", "layernorm_before"), ("mlp_norm", "layernorm_after")):
            out[f"{ours}{norm}/scale"] = (f"{hf}{name}.weight", same, same)
            out[f"{ours}{norm}/bias"] = (f"{hf}{name}.bias", same, same)
    return out


# ----------------------------------------------------------------------------- ViT
def vit_config(hf: dict, what: str):
    """The run's config (configs/vit.py:tiny with the checkpoint's shapes)."""
    get = lambda key: hf.get(key, VIT_DEFAULTS[key])  # noqa: E731
    require(hf, "num_channels", (3,), what, VIT_DEFAULTS)  # RGB images
    size = get("image_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"import-hf: config.json image_size={size!r} is not supported for "
                              f"{what}; supported: square images (one size)")
        size = size[0]
    patch = get("patch_size")
    if isinstance(patch, (list, tuple)):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ConfigError(f"import-hf: config.json patch_size={patch!r} is not supported "
                              f"for {what}; supported: square patches (one size)")
        patch = patch[0]
    k = num_labels(hf)
    if k < 1:
        raise ConfigError(f"import-hf: config.json num_labels={k} is not supported for {what}; "
                          "supported: 1 or more (a classifier)")
    return load_config(f"{CONFIG_FILE}:tiny", [
        *encoder_overrides(hf, what, VIT_DEFAULTS), f"data.image_size={size}",
        f"model.patch_size={patch}", "model.pool=cls", f"model.num_classes={k}"])


def vit_hf_config(config, arch: str, head: bool) -> dict:
    """A run's config.json as `arch` (ConfigError naming the fields it cannot hold)."""
    m = config.model
    problems = encoder_problems(m, arch)
    if m.pool != "cls":
        problems.append(f"pool={m.pool!r} ({arch}: 'cls', a CLS token)")
    if head and m.probe:
        problems.append(f"probe={m.probe!r} ({arch}: '', a Linear on the CLS token; "
                        "--architecture=ViTModel writes the backbone alone)")
    if problems:
        raise ConfigError(f"config.model: {', '.join(problems)}")
    out = dict(encoder_hf_config(m), model_type="vit", image_size=config.data.image_size,
               patch_size=m.patch_size, num_channels=3)  # (encoder_stride: masked modelling's)
    if head:
        out.update(labels(m.num_classes))
    return out


def vit_tensors(config, prefix: str, head: bool) -> dict:
    """{our parameter name: (HF tensor name, to ours, to HF)}."""
    # source: transformers models/vit/modeling_vit.py (ViTEmbeddings, ViTModel, ViTFor...)
    m = config.model
    p, d = m.patch_size, m.d_model
    emb = f"{prefix}embeddings."
    out = {
        # Conv2d weight [D, C, p_y, p_x] <-> patchify's kernel [(p_y, p_x, C), D]
        "backbone/patch_embed/kernel": (
            f"{emb}patch_embeddings.projection.weight",
            lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * 3, d),
            lambda k: k.reshape(p, p, 3, d).transpose(3, 2, 0, 1)),
        "backbone/patch_embed/bias": (f"{emb}patch_embeddings.projection.bias", same, same),
        "backbone/cls": (f"{emb}cls_token", same, same),  # [1, 1, D] both
        "backbone/pos_embed": (f"{emb}position_embeddings", lambda w: w[0], lambda w: w[None]),
        **encoder_layers(m.num_layers, prefix),
        **norm_map("backbone/final_norm", f"{prefix}layernorm"),
    }
    if head:
        out.update(linear_map("classifier", "classifier"))
    return out


VIT_CLASSIFIER = HFImporter(
    config=lambda hf: vit_config(hf, "ViTForImageClassification"),
    hf_config=lambda c: vit_hf_config(c, "ViTForImageClassification", head=True),
    tensors=lambda c: vit_tensors(c, "vit.", head=True),
    ignored=("embeddings.mask_token",))  # (a masked-image-modelling checkpoint's)
VIT_MODEL = HFImporter(
    config=lambda hf: vit_config(hf, "ViTModel"),
    hf_config=lambda c: vit_hf_config(c, "ViTModel", head=False),
    tensors=lambda c: vit_tensors(c, "", head=False),
    ignored=("pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token"),
    ours_only="^(classifier|probe)/")
# export-hf writes the first that can hold a run: a supervised run as the classifier
IMPORTERS = {"ViTForImageClassification": VIT_CLASSIFIER, "ViTModel": VIT_MODEL}
