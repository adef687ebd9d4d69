"""Fine-tuning an imported model with its tokenizer (issue 26 "Done when"): import-hf a model
directory that carries a tokenizer, fine-tune it with configs/lm.py:finetune (LoRA) on text,
export-hf it, and read the export back: every step one command, on the tiny Llama golden."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import param_arrays, run_trainer
from test_tokenizers import TEXTS, write_corpus
from trainer.cli import load_config
from trainer.config import ConfigError
from trainer.tokenizer import load_tokenizer, train_bpe

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")
SMALL = ("train.steps=3", "train.global_batch_size=8", "data.seq_len=16", "eval.every=3",
         "eval.batches=1", "checkpoint.every=3", "sample.max_new_tokens=4", "train.log_every=1")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny Llama golden with a 259-token BPE beside it (its vocabulary), imported."""
    from trainer.convert import main

    root = tmp_path_factory.mktemp("ft")
    hf = str(root / "llama_with_tokenizer")
    shutil.copytree(os.path.join(GOLDENS, "llama_tiny"), hf)
    train_bpe(TEXTS, 259, hf, progress=False)
    run = str(root / "run")
    assert main(["import-hf", hf, run]) == 0
    return {"root": root, "run": run, "corpus": write_corpus(root / "text")}


def test_import_carries_the_tokenizer(imported):
    saved = json.load(open(os.path.join(imported["run"], "polyformer_config.json")))
    assert saved["data"]["tokenizer"] == os.path.join(imported["run"], "tokenizer")
    assert load_tokenizer(saved["data"]["tokenizer"]).vocab_size == 259


def test_lora_finetune_then_export_round_trips(imported, tmp_path):
    from trainer.api import load_checkpoint
    from trainer.convert import export_hf, import_hf

    config = load_config("configs/lm.py:finetune", [
        f"init_from={imported['run']}", f"data.paths={imported['corpus']}", *SMALL])
    # the shapes and the tokenizer are the imported run's (init_from_config), LoRA is ours
    assert (config.model.num_heads, config.model.head_dim, config.model.vocab_size) == (6, 24, 259)
    assert config.data.tokenizer == os.path.join(imported["run"], "tokenizer")
    assert config.model.lora_rank == 8
    run = run_trainer(config, tmp_path / "ft")
    before, _ = load_checkpoint(imported["run"])
    after, _ = load_checkpoint(run.workdir)
    changed = {k for k, v in run.params.items() if "lora_" not in k}
    # frozen: every pretrained weight is unchanged, the low-rank updates moved
    from conftest import param_arrays
    base = param_arrays(before)
    for k in changed:
        np.testing.assert_array_equal(run.params[k], base[k], err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in run.params.items() if "lora_b" in k)

    hf = str(tmp_path / "hf")
    export_hf(run.workdir, hf)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(hf))
    # the export holds W + (alpha / r) A B: reading it back gives the fine-tuned logits
    back = import_hf(hf, str(tmp_path / "back"))
    again, config_back = load_checkpoint(back)
    assert config_back.model.lora_rank == 0
    tokens = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) * 7 % 259)
    want = np.asarray(after(tokens)[0])
    got = np.asarray(again(tokens)[0])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert not np.allclose(np.asarray(before(tokens)[0]), want)  # the fine-tune changed them


def test_init_from_config_errors(imported, tmp_path):
    from trainer.cli import check

    with pytest.raises(ConfigError, match="init_from_config.*set --config.init_from=RUN_DIR"):
        check(load_config("configs/lm.py:finetune"))
    with pytest.raises(ConfigError, match="holds no checkpoint with a saved config"):
        load_config("configs/lm.py:finetune", [f"init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="is a 'lm' run; this config is 'tokenformer'"):
        load_config("configs/tokenformer.py:tiny", [f"init_from={imported['run']}",
                                                    "init_from_config=model.d_model"])
    # explicit overrides win over what is inherited
    c = load_config("configs/lm.py:finetune", [f"init_from={imported['run']}",
                                               "model.lora_alpha=4.0", "data.tokenizer=bytes"])
    assert c.data.tokenizer == "bytes" and c.model.lora_alpha == 4.0 and c.model.d_model == 32
