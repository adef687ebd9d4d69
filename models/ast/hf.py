"""Hugging Face ASTForAudioClassification <-> the ast family (ASTTask.hf_importers; `python -m
trainer.convert import-hf` / `export-hf`).

The mapping follows transformers' models/audio_spectrogram_transformer/
modeling_audio_spectrogram_transformer.py: ASTEmbeddings takes input_values [B, T, F] (time,
mel bins), makes it the 1-channel image [B, 1, F, T] (frequency is the height) and embeds
p x p patches with a Conv2d of strides (frequency_stride, time_stride), flattened row-major over
(f, t); the CLS and distillation tokens come first; learned position embeddings for the
2 + f t tokens; the ViT layers (models/vit_hf.py encoder_layers); a final LayerNorm; pooled =
(x_cls + x_dist) / 2; ASTMLPHead = LayerNorm + Linear. models/ast/model.py AST takes the same
normalised fbank [B, T, F] and transposes it alike (a [B, F, T, 1] NHWC conv), so the conv
weight [D, 1, p_f, p_t] is the kernel [p_f, p_t, 1, D] and the two tokens (cls_token,
distillation_token, each [1, 1, D]) are our one `cls` [1, 2, D]. Here: model.pool="cls_dist",
model.classifier_norm=True, model.softmax_bias=True, model.norm_eps=layer_norm_eps,
model.fstride / tstride = frequency_stride / time_stride, data.num_mel_bins = num_mel_bins,
data.target_length = max_length.

The front end: transformers' ASTFeatureExtractor computes the same Kaldi fbank
(models/ast/audio.py) and normalises (x - mean) / (2 std) like data.norm_mean / norm_std. Its
mean and std live in preprocessor_config.json, not config.json: the import sets AudioSet's
(-4.2677393, 4.5689974, the extractor's defaults and what the MIT/ast-* checkpoints use);
pass --config.data.norm_mean / norm_std to import-hf for a checkpoint normalised otherwise. The
export writes no preprocessor_config.json (give ASTFeatureExtractor the run's mean / std).
"""
from __future__ import annotations

import os

import numpy as np

from models import vit_hf
from trainer.cli import load_config
from trainer.config import ConfigError
from trainer.hf import HFImporter, linear_map, norm_map, same

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "ast.py")
ARCH = "ASTForAudioClassification"
# transformers' ASTConfig defaults (what a key absent from config.json means)
AST_DEFAULTS = dict(vit_hf.VIT_DEFAULTS, patch_size=16, frequency_stride=10, time_stride=10,
                    max_length=1024, num_mel_bins=128)
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974  # ASTFeatureExtractor's defaults
PREFIX = "audio_spectrogram_transformer."
# PETL methods whose result is a plain AST: their parameters are its own, or LoRA's update,
# which export-hf merges into W_q and W_v; adapters and prompts have no place there
EXPORTABLE_PETL = ("full", "linear", "bitfit", "lora")


def ast_config(hf: dict):
    """The run's config (configs/ast.py:tiny with the checkpoint's shapes)."""
    get = lambda key: hf.get(key, AST_DEFAULTS[key])  # noqa: E731
    k = vit_hf.num_labels(hf)
    if k < 1:
        raise ConfigError(f"import-hf: config.json num_labels={k} is not supported for {ARCH}; "
                          "supported: 1 or more (a classifier)")
    return load_config(f"{CONFIG_FILE}:tiny", [
        *vit_hf.encoder_overrides(hf, ARCH, AST_DEFAULTS),
        f"model.patch_size={get('patch_size')}", f"model.fstride={get('frequency_stride')}",
        f"model.tstride={get('time_stride')}", f"data.num_mel_bins={get('num_mel_bins')}",
        f"data.target_length={get('max_length')}", f"data.norm_mean={AUDIOSET_MEAN}",
        f"data.norm_std={AUDIOSET_STD}", "model.pool=cls_dist", "model.classifier_norm=True",
        f"model.num_classes={k}"])


def ast_hf_config(config) -> dict:
    """A run's config.json as ASTForAudioClassification (ConfigError naming the fields it
    cannot hold)."""
    m, d = config.model, config.data
    problems = vit_hf.encoder_problems(m, ARCH)
    if m.pool != "cls_dist":
        problems.append(f"pool={m.pool!r} ({ARCH}: 'cls_dist', the mean of the CLS and "
                        "distillation tokens)")
    if not m.get("classifier_norm", False):
        problems.append(f"classifier_norm=False ({ARCH}: True, a LayerNorm before the "
                        "classifier)")
    if m.petl not in EXPORTABLE_PETL:
        problems.append(f"petl={m.petl!r} ({ARCH} has no place for its {m.petl} "
                        f"parameters; {', '.join(map(repr, EXPORTABLE_PETL))})")
    if problems:
        raise ConfigError(f"config.model: {', '.join(problems)}")
    return dict(vit_hf.encoder_hf_config(m), model_type="audio-spectrogram-transformer",
                patch_size=m.patch_size, frequency_stride=m.fstride, time_stride=m.tstride,
                max_length=d.target_length, num_mel_bins=d.num_mel_bins,
                **vit_hf.labels(m.num_classes, tuple(d.classes)))


def ast_tensors(config) -> dict:
    """{our parameter name: (HF tensor name(s), to ours, to HF)}."""
    # source: transformers models/audio_spectrogram_transformer/modeling_audio_spectrogram_
    # transformer.py (ASTEmbeddings, ASTPatchEmbeddings, ASTModel, ASTMLPHead)
    emb = f"{PREFIX}embeddings."
    return {
        # Conv2d weight [D, 1, p_f, p_t] <-> flax Conv kernel [p_f, p_t, 1, D]
        "backbone/patch_embed/kernel": (f"{emb}patch_embeddings.projection.weight",
                                        lambda w: w.transpose(2, 3, 1, 0),
                                        lambda k: k.transpose(3, 2, 0, 1)),
        "backbone/patch_embed/bias": (f"{emb}patch_embeddings.projection.bias", same, same),
        # two [1, 1, D] tokens <-> our [1, 2, D] (CLS first)
        "backbone/cls": ((f"{emb}cls_token", f"{emb}distillation_token"),
                         lambda c, t: np.concatenate([c, t], axis=1),
                         lambda x: (x[:, :1], x[:, 1:])),
        "backbone/pos_embed": (f"{emb}position_embeddings", lambda w: w[0], lambda w: w[None]),
        **vit_hf.encoder_layers(config.model.num_layers, PREFIX),
        **norm_map("backbone/final_norm", f"{PREFIX}layernorm"),
        **norm_map("classifier_norm", "classifier.layernorm"),
        **linear_map("classifier", "classifier.dense"),
    }


AST = HFImporter(config=ast_config, hf_config=ast_hf_config, tensors=ast_tensors)
IMPORTERS = {ARCH: AST}
