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


if __name__ == "__main__":
    write("llama_tiny", llama_tiny(), transformers.LlamaForCausalLM)
    write("gpt2_tiny", gpt2_tiny(), transformers.GPT2LMHeadModel)
