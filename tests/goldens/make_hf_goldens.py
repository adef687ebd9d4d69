"""Writes the Hugging Face goldens the suite checks the importer against (issue 26): tiny
randomly initialised `transformers` models saved as HF directories (config.json +
model.safetensors) and, next to each, their logits and greedy continuation on fixed tokens.

Run by hand where torch and transformers are installed (not in the suite, which needs neither),
e.g. a Python 3.11 venv: `pip install torch transformers safetensors`, then
    python tests/goldens/make_hf_goldens.py
Deterministic (seeded); the files are small (kilobytes to a few hundred).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS = np.array([[1, 5, 9, 2, 33, 60, 17, 8, 44, 3, 12],
                   [7, 7, 0, 59, 21, 30, 4, 4, 50, 11, 2]], np.int64)
NEW_TOKENS = 8


def llama_tiny():
    """Llama 3 shapes at toy size: GQA 6:2, head dim 24 (not d_model / heads), rope_theta 5e5
    with llama3 frequency scaling whose bands all occur, RMSNorm eps 1e-5, untied head."""
    return transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=24, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=1,
        eos_token_id=2, torch_dtype="float32")


def gpt2_tiny():
    """GPT-2 shapes at toy size: head dim 8 (6 heads of 48), n_inner null (4 * n_embd), learned
    positions (32), LayerNorm eps 1e-5, the tanh GELU, tied head."""
    return transformers.GPT2Config(
        vocab_size=259, n_embd=48, n_layer=2, n_head=6, n_positions=32, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32")


def write(name, config, cls):
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # random init is N(0, 0.02), biases 0: widen the norms and draw the
        for n, p in model.named_parameters():  # biases so that they matter too
            if n.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    out = os.path.join(HERE, name)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(TOKENS)).logits.float().numpy()
        prompt = torch.from_numpy(TOKENS[:, :6])  # (an explicit mask: token 0 is no padding)
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0).numpy()[:, 6:]
    np.savez(os.path.join(HERE, f"{name}.npz"), tokens=TOKENS, logits=logits, greedy=greedy)
    with open(os.path.join(HERE, f"{name}.versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)
    print(name, logits.shape, "greedy", greedy.tolist())




# ----------------------------------------------------------------------------- vision and audio
# (issue 26: models/vit_hf.py and models/ast/hf.py). Odd sizes: head dim 6, a 5 x 5 patch grid;
# AST's strides differ (3 in frequency, overlapping its 4 x 4 patches; 2 in time) over a
# 16-bin x 24-frame input, a 5 x 11 grid. Weights drawn wider than transformers' N(0, 0.02),
# and biases, tokens, position embeddings and LayerNorms (which it initialises to constants)
# drawn too, so that attention is far from uniform and every tensor matters.
def vit_tiny():
    return transformers.ViTConfig(
        image_size=20, patch_size=4, num_channels=3, hidden_size=36, num_hidden_layers=2,
        num_attention_heads=6, intermediate_size=52, hidden_act="gelu", layer_norm_eps=1e-12,
        qkv_bias=True, initializer_range=0.2, num_labels=5)


def vit_model_tiny():
    """ViTModel (add_pooling_layer: its pooler is saved, and ignored by the importer)."""
    return transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=30, hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True, initializer_range=0.2)


def ast_tiny():
    return transformers.ASTConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        hidden_act="gelu", layer_norm_eps=1e-12, patch_size=4, qkv_bias=True,
        frequency_stride=3, time_stride=2, max_length=24, num_mel_bins=16,
        initializer_range=0.2, num_labels=3)


def _draw_every_tensor(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n and n.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias") or "token" in n or "position_embeddings" in n:
                p.copy_(0.3 * torch.randn_like(p))


def write_encoder(name, config, cls, inputs: np.ndarray, input_name: str, output: str):
    """An encoder golden: the HF directory, and in {name}.npz the fixed input (under its
    transformers name: pixel_values NCHW, input_values [B, T, F]) and `output` of the model
    (logits, or last_hidden_state of a ViTModel)."""
    torch.manual_seed(0)
    model = cls(config).eval()
    _draw_every_tensor(model)
    out = os.path.join(HERE, name)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        result = getattr(model(**{input_name: torch.from_numpy(inputs)}), output).numpy()
    np.savez(os.path.join(HERE, f"{name}.npz"), **{input_name: inputs, output: result})
    with open(os.path.join(HERE, f"{name}.versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)
    print(name, output, result.shape)


def write_vision_and_audio():
    rng = np.random.default_rng(26)
    # images as the vit family feeds them: (pixel / 255 - 0.5) / 0.5, in [-1, 1]
    write_encoder("vit_tiny", vit_tiny(), transformers.ViTForImageClassification,
                  rng.uniform(-1, 1, (2, 3, 20, 20)).astype(np.float32), "pixel_values",
                  "logits")
    write_encoder("vit_model_tiny", vit_model_tiny(), transformers.ViTModel,
                  rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32), "pixel_values",
                  "last_hidden_state")
    # a normalised fbank [B, T = max_length, F = num_mel_bins]
    write_encoder("ast_tiny", ast_tiny(), transformers.ASTForAudioClassification,
                  rng.standard_normal((2, 24, 16)).astype(np.float32), "input_values", "logits")


if __name__ == "__main__":
    write("llama_tiny", llama_tiny(), transformers.LlamaForCausalLM)
    write("gpt2_tiny", gpt2_tiny(), transformers.GPT2LMHeadModel)
    write_vision_and_audio()
