"""The Hedgehog conversion workflow (configs/lm.py:hedgehog_distill -> :hedgehog_finetune) at
tiny scale: a softmax LM's checkpoint, feature maps trained alone on the distillation loss
(train.trainable, init_from_new), then everything fine-tuned."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tiny_config, run_trainer
from trainer import ConfigError, Trainer


def test_softmax_to_hedgehog_distill_then_finetune(tmp_path):
    softmax = run_trainer(make_tiny_config("train.steps=3"), tmp_path / "softmax")

    distill_cfg = make_tiny_config(
        "train.steps=4", "train.lr=1e-2", "model.attention=hedgehog",
        "model.hedgehog_distill=true", "train.trainable=feature_map",
        f"init_from={tmp_path / 'softmax'}", "init_from_new=feature_map")
    distill = run_trainer(distill_cfg, tmp_path / "distill")
    aux = [distill.train_metrics[s]["aux_loss"] for s in sorted(distill.train_metrics)]
    assert all(np.isfinite(aux)) and aux[-1] < aux[0], f"distillation loss did not fall: {aux}"
    for step, m in distill.train_metrics.items():  # loss = next-byte NLL + distillation loss
        np.testing.assert_allclose(m["loss"], m["nll"] + m["aux_loss"], rtol=1e-5)
    maps = [k for k in distill.params if "feature_map" in k]
    assert maps, "the hedgehog model has feature maps"
    for name, value in distill.params.items():
        if "feature_map" in name:
            continue
        # everything else came from the softmax run and stayed frozen
        np.testing.assert_array_equal(value, softmax.params[name], err_msg=name)

    finetune_cfg = make_tiny_config("train.steps=2", "model.attention=hedgehog",
                                    f"init_from={tmp_path / 'distill'}")
    with Trainer(finetune_cfg, str(tmp_path / "finetune"), quiet=True) as t:
        start = {k: np.asarray(v) for k, v in _params(t).items()}
    for name in distill.params:  # every parameter, feature maps included, transfers
        np.testing.assert_array_equal(start[name], distill.params[name], err_msg=name)
    finetune = run_trainer(finetune_cfg, tmp_path / "finetune")
    assert finetune.result["step"] == 2 and np.isfinite(finetune.result["eval"]["loss"])
    assert "aux_loss" not in finetune.train_metrics[2], "no distillation when fine-tuning"


def _params(trainer):
    from conftest import param_arrays
    return param_arrays(trainer.model)


def test_trainable_matching_nothing_or_bad_regex_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.trainable"):
        Trainer(make_tiny_config("train.trainable=("), str(tmp_path / "a"), quiet=True)
    with pytest.raises(ConfigError, match="train.trainable"):
        Trainer(make_tiny_config("train.trainable=no_such_parameter"), str(tmp_path / "b"),
                quiet=True)
