"""Hugging Face checkpoints in (issue 26): the tiny goldens of tests/goldens (written by
make_hf_goldens.py with transformers; the suite needs neither torch nor transformers) imported
with `python -m trainer.convert import-hf`, then compared with transformers' own outputs."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from trainer.config import ConfigError

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")
LLAMA = os.path.join(GOLDENS, "llama_tiny")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from trainer.convert import main

    run = str(tmp_path_factory.mktemp("hf") / "llama")
    assert main(["import-hf", LLAMA, run]) == 0
    return run


def test_imported_llama_gives_transformers_logits_and_greedy_tokens(llama_run):
    from models.lm import generate
    from trainer.api import load_checkpoint

    golden = np.load(os.path.join(GOLDENS, "llama_tiny.npz"))
    model, config = load_checkpoint(llama_run)
    assert (config.model.num_heads, config.model.num_kv_heads, config.model.head_dim) == (6, 2, 24)
    assert config.model.rope_scaling == "llama3" and config.model.norm_eps == 1e-5
    logits = np.asarray(model(jnp.asarray(golden["tokens"], jnp.int32))[0])
    want = golden["logits"]
    assert np.abs(logits - want).max() / np.abs(want).max() < 1e-4
    greedy = generate(model, jnp.asarray(golden["tokens"][:, :6], jnp.int32),
                      golden["greedy"].shape[1], temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy), golden["greedy"])


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


def _broken(tmp_path, edit=None, config=None):
    root = tmp_path / "hf"
    shutil.copytree(LLAMA, root)
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


def test_import_then_export_round_trips_bit_exactly(llama_run, tmp_path, capsys):
    from trainer.convert import main
    from trainer.hf import SafeTensors

    out = tmp_path / "exported"
    assert main(["export-hf", llama_run, str(out)]) == 0
    ours, theirs = SafeTensors(str(out / "model.safetensors")), SafeTensors(
        os.path.join(LLAMA, "model.safetensors"))
    assert sorted(ours.names()) == sorted(theirs.names())
    for name in theirs.names():
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    exported = json.loads((out / "config.json").read_text())
    original = json.loads(open(os.path.join(LLAMA, "config.json")).read())
    for key in ("architectures", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rope_theta", "rms_norm_eps", "tie_word_embeddings", "rope_scaling"):
        assert exported[key] == original[key], key
    assert main(["export-hf", llama_run, str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_export_names_what_no_architecture_can_hold(tmp_path, capsys):
    from conftest import make_tiny_config, run_trainer
    from trainer.convert import main

    run_trainer(make_tiny_config("train.steps=1", "model.norm=layernorm"), tmp_path / "run")
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "matches no Hugging Face architecture" in err and "norm='layernorm'" in err
