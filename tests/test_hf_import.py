"""Hugging Face checkpoints in and out (issue 26): the tiny goldens of tests/goldens (written by
make_hf_goldens.py with transformers; the suite needs neither torch nor transformers) imported
with `python -m trainer.convert import-hf`, then compared with transformers' own outputs."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.config import ConfigError

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")
LLAMA = os.path.join(GOLDENS, "llama_tiny")
GPT2 = os.path.join(GOLDENS, "gpt2_tiny")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from trainer.convert import main

    run = str(tmp_path_factory.mktemp("hf") / "llama")
    assert main(["import-hf", LLAMA, run]) == 0
    return run


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    from trainer.convert import main

    run = str(tmp_path_factory.mktemp("hf") / "gpt2")
    assert main(["import-hf", GPT2, run]) == 0
    return run


def _logits_and_greedy_match(run, name):
    from models.lm import generate
    from trainer.api import load_checkpoint

    golden = np.load(os.path.join(GOLDENS, f"{name}.npz"))
    model, config = load_checkpoint(run)
    logits = np.asarray(model(jnp.asarray(golden["tokens"], jnp.int32))[0])
    want = golden["logits"]
    assert np.abs(logits - want).max() / np.abs(want).max() < 1e-4
    greedy = generate(model, jnp.asarray(golden["tokens"][:, :6], jnp.int32),
                      golden["greedy"].shape[1], temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy), golden["greedy"])
    return config


def test_imported_llama_gives_transformers_logits_and_greedy_tokens(llama_run):
    config = _logits_and_greedy_match(llama_run, "llama_tiny")
    assert (config.model.num_heads, config.model.num_kv_heads, config.model.head_dim) == (6, 2, 24)
    assert config.model.rope_scaling == "llama3" and config.model.norm_eps == 1e-5


def test_imported_gpt2_gives_transformers_logits_and_greedy_tokens(gpt2_run):
    m = _logits_and_greedy_match(gpt2_run, "gpt2_tiny").model
    assert (m.norm, m.mlp, m.position, m.max_len, m.mlp_dim) == ("layernorm", "gelu", "learned",
                                                                 32, 192)
    assert m.mlp_bias and m.softmax_bias and m.tie_embeddings and m.rope_theta == 0


def test_gpt2_saved_from_the_base_model_imports_too(gpt2_run, tmp_path):
    """The hub's gpt2 names its tensors without 'transformer.' (saved from GPT2Model) and keeps
    each layer's causal-mask buffer (h.N.attn.bias): the same parameters come in."""
    from trainer.api import load_checkpoint
    from trainer.convert import import_hf
    from trainer.hf import SafeTensors, write_safetensors

    root = tmp_path / "hub"
    shutil.copytree(GPT2, root)
    st = SafeTensors(str(root / "model.safetensors"))
    bare = {n.removeprefix("transformer."): np.array(st[n]) for n in st.names()}
    bare.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32))
                 for i in range(2)})
    write_safetensors(str(root / "model.safetensors"), bare)
    import_hf(str(root), str(tmp_path / "run"))
    ours, want = (nnx.state(load_checkpoint(r)[0], nnx.Param)
                  for r in (str(tmp_path / "run"), gpt2_run))
    for (path, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(want)):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_the_imported_run_trains_on_from_step_0(tmp_path):
    """import-hf with the run's own fields, then the CLI on the run's config file."""
    from conftest import steps_on_disk
    from trainer.convert import main as convert
    from trainer.main import main

    run = str(tmp_path / "run")
    assert convert(["import-hf", LLAMA, run, "--config.train.steps=2", "--config.eval.every=0",
                    "--config.train.log_every=1", "--config.sample.max_new_tokens=0",
                    "--config.data.seq_len=32", "--config.train.global_batch_size=8",
                    "--config.train.warmup_steps=0"]) == 0
    assert main([f"--config={run}/config.py", f"--workdir={run}"]) == 0
    assert steps_on_disk(run) == [0, 2]


def _broken(tmp_path, edit=None, config=None, source=LLAMA):
    root = tmp_path / "hf"
    shutil.copytree(source, root)
    if config:
        c = json.loads((root / "config.json").read_text())
        c.update(config)
        (root / "config.json").write_text(json.dumps(c))
    if edit:
        edit(root)
    return str(root)


def test_bad_checkpoints_are_named(tmp_path, capsys):
    from trainer.convert import import_hf, main

    with pytest.raises(ConfigError, match=r"architecture 'MambaForCausalLM' is not supported; "
                                          r"supported: .*LlamaForCausalLM"):
        import_hf(_broken(tmp_path / "a", config={"architectures": ["MambaForCausalLM"]}),
                  str(tmp_path / "a" / "run"))
    with pytest.raises(ConfigError, match=r"hidden_act='gelu' is not supported"):
        import_hf(_broken(tmp_path / "b", config={"hidden_act": "gelu"}), str(tmp_path / "b" / "r"))
    # a layer more in the config than in the file: the missing tensors are named
    with pytest.raises(ConfigError, match=r"blocks/2/attn/q_proj/kernel: tensor "
                                          r"'model.layers.2.self_attn.q_proj.weight' is not in"):
        import_hf(_broken(tmp_path / "c", config={"num_hidden_layers": 3}), str(tmp_path / "c" / "r"))
    # a tensor of the wrong shape is named with both shapes
    with pytest.raises(ConfigError, match=r"blocks/0/mlp/w1/kernel: tensor 'model.layers.0.mlp."
                                          r"gate_proj.weight' has shape \(48, 32\).*needs \(32, 40\)"):
        import_hf(_broken(tmp_path / "d", config={"intermediate_size": 40}),
                  str(tmp_path / "d" / "r"))

    def shard(root):  # an index naming a shard that is not there
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    assert main(["import-hf", _broken(tmp_path / "e", shard), str(tmp_path / "e" / "r")]) == 2
    err = capsys.readouterr().err
    assert "shard" in err and "model-00001-of-00002.safetensors" in err and "missing" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key,value,allowed", [
    ("activation_function", "gelu", "'gelu_new', 'gelu_pytorch_tanh'"),
    ("scale_attn_by_inverse_layer_idx", True, "False"),
    ("reorder_and_upcast_attn", True, "False"),
    ("scale_attn_weights", False, "True"),
    ("add_cross_attention", True, "False"),
    ("n_inner", "4x", "a positive integer"),
    ("n_inner", 1.5, "a positive integer"),
    ("n_positions", None, "a positive integer"),
])
def test_gpt2_config_values_the_model_cannot_hold_are_named(tmp_path, key, value, allowed):
    from trainer.convert import import_hf

    with pytest.raises(ConfigError, match=rf"config.json {key}={value!r} is not supported for "
                                          rf"GPT2LMHeadModel.*supported: {allowed}"):
        import_hf(_broken(tmp_path, config={key: value}, source=GPT2), str(tmp_path / "r"))


def test_gpt2_tensors_of_the_wrong_shape_are_named(tmp_path):
    from trainer.convert import import_hf
    from trainer.hf import SafeTensors, write_safetensors

    def narrow_c_attn(root):  # a fused q/k/v of 2 * n_embd: named with what it must hold
        st = SafeTensors(str(root / "model.safetensors"))
        tensors = {n: np.array(st[n]) for n in st.names()}
        tensors["transformer.h.1.attn.c_attn.weight"] = tensors[
            "transformer.h.1.attn.c_attn.weight"][:, :96]
        write_safetensors(str(root / "model.safetensors"), tensors)

    with pytest.raises(ConfigError) as e:
        import_hf(_broken(tmp_path / "a", narrow_c_attn, source=GPT2), str(tmp_path / "a" / "r"))
    assert ("blocks/1/attn/q_proj/kernel: tensor 'transformer.h.1.attn.c_attn.weight' has shape "
            "(48, 96), which maps to (48, 96); this model needs (48, 144) (it holds "
            "blocks/1/attn/q_proj/kernel, blocks/1/attn/k_proj/kernel, "
            "blocks/1/attn/v_proj/kernel on its last axis)") in str(e.value)
    # n_inner 40 in the config, 4 * 48 in the file
    with pytest.raises(ConfigError, match=r"blocks/0/mlp/fc/kernel: tensor 'transformer.h.0.mlp."
                                          r"c_fc.weight' has shape \(48, 192\).*needs \(48, 40\)"):
        import_hf(_broken(tmp_path / "b", config={"n_inner": 40}, source=GPT2),
                  str(tmp_path / "b" / "r"))


def test_safetensors_reader_reads_bf16_and_checks_sizes(tmp_path):
    from trainer.hf import SafeTensors

    def write(path, header, data):
        head = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head + data)

    bits = np.array([0x3F80, 0xC000, 0x3EAA], np.uint16)  # bf16 1.0, -2.0, 0.33203125
    write(tmp_path / "a.safetensors", {"w": {"dtype": "BF16", "shape": [3],
                                             "data_offsets": [0, 6]},
                                       "__metadata__": {"format": "pt"}}, bits.tobytes())
    np.testing.assert_array_equal(SafeTensors(str(tmp_path / "a.safetensors"))["w"],
                                  np.array([1.0, -2.0, 0.33203125], np.float32))
    write(tmp_path / "b.safetensors", {"w": {"dtype": "F32", "shape": [2, 2],
                                             "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ConfigError, match=r"tensor 'w' holds 2 values, its shape \[2, 2\]"):
        SafeTensors(str(tmp_path / "b.safetensors"))["w"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_import_then_export_round_trips_bit_exactly(name, request, tmp_path, capsys):
    """Every tensor, GPT-2's fused c_attn included (q, k, v concatenated back)."""
    from trainer.convert import main
    from trainer.hf import SafeTensors

    run, source = request.getfixturevalue(f"{name}_run"), {"llama": LLAMA, "gpt2": GPT2}[name]
    out = tmp_path / "exported"
    assert main(["export-hf", run, str(out)]) == 0
    ours, theirs = SafeTensors(str(out / "model.safetensors")), SafeTensors(
        os.path.join(source, "model.safetensors"))
    assert sorted(ours.names()) == sorted(theirs.names())
    for tensor in theirs.names():
        np.testing.assert_array_equal(ours[tensor], theirs[tensor], err_msg=tensor)
    exported = json.loads((out / "config.json").read_text())
    original = json.loads(open(os.path.join(source, "config.json")).read())
    keys = {"llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                      "rms_norm_eps", "tie_word_embeddings", "rope_scaling"),
            "gpt2": ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                     "activation_function", "layer_norm_epsilon", "scale_attn_weights",
                     "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")}[name]
    for key in ("architectures", *keys):
        assert exported[key] == original[key], key
    if name == "gpt2":  # n_inner null there is 4 * n_embd; tied by default
        assert exported["n_inner"] == 4 * original["n_embd"] and exported["tie_word_embeddings"]
    assert main(["export-hf", run, str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_gpt2_export_refuses_a_run_that_is_not_gpt2_shaped():
    """configs/lm.py peer_a is GPT-2 shaped but bias-free: the fields that differ are named."""
    from models.lm.hf import CONFIG_FILE as lm, gpt2_hf_config
    from trainer.cli import load_config

    with pytest.raises(ConfigError, match=r"^config.model: softmax_bias=False \(GPT-2: True\), "
                                          r"mlp_bias=False \(GPT-2: True\)$"):
        gpt2_hf_config(load_config(f"{lm}:peer_a"))
    with pytest.raises(ConfigError, match=r"norm='rmsnorm' \(GPT-2: 'layernorm'\), mlp='swiglu' "
                                          r"\(GPT-2: 'gelu'\), position='rope'.*num_kv_heads=2 "
                                          r"\(GPT-2: 4\), rope_theta=10000.0 \(GPT-2: 0.0\)"):
        gpt2_hf_config(load_config(f"{lm}:tiny"))


def test_export_names_what_no_architecture_can_hold(tmp_path, capsys):
    from conftest import make_tiny_config, run_trainer
    from trainer.convert import main

    run_trainer(make_tiny_config("train.steps=1", "model.norm=layernorm"), tmp_path / "run")
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "matches no Hugging Face architecture" in err and "norm='layernorm'" in err
    assert "GPT2LMHeadModel: config.model: mlp='swiglu' (GPT-2: 'gelu')" in err
