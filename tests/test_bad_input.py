"""Bad input ends a command with one message and exit status 2, never a traceback, with or
without --dry_run (issue 25, item 3); an eval-only run does not claim checkpoints it never wrote."""
from __future__ import annotations

import pytest

from conftest import TEST_OVERRIDES, TINY
from trainer.main import main

CLI = [f"--config={TINY}", *[f"--config.{o}" for o in TEST_OVERRIDES]]


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("override,message", [
    ("model.attention=nosuch", "config.model.attention: .*nosuch"),
    ("model.num_kv_heads=3", "num_heads=4 must be a multiple of config.model.num_kv_heads=3"),
    ("model.num_heads=0", "config.model.num_heads=0: must be >= 1"),
    ("model.num_kv_heads=0", "config.model.num_kv_heads=0: must be >= 1"),
    ("model.d_model=-64", "config.model.d_model=-64: must be >= 1"),
    ("model.num_layers=0", "config.model.num_layers=0: must be >= 1"),
])
def test_a_bad_model_value_is_one_message_and_exit_2(tmp_path, capsys, override, message,
                                                     dry_run):
    import re

    args = [*CLI, f"--workdir={tmp_path / 'w'}", f"--config.{override}"]
    assert main(args + ["--dry_run"] * dry_run) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not list((tmp_path / "w").glob("checkpoints/[0-9]*"))


def test_an_eval_only_run_says_it_wrote_no_checkpoint(tmp_path, capsys):
    assert main([*CLI, f"--workdir={tmp_path}", "--config.train.steps=0"]) == 0
    out = capsys.readouterr().out
    assert "done: step 0" in out and "nothing was trained, no checkpoint written" in out
    assert "checkpoints in" not in out


@pytest.mark.parametrize("family", ["lm", "tokenformer", "vit", "iformer", "detr", "mixformer",
                                    "ast"])
def test_a_config_files_get_config_is_locked_with_its_mechanism_options(family):
    """A notebook's misspelt field fails as the CLI's does; the mechanism's options are there."""
    import importlib

    config = importlib.import_module(f"configs.{family}").get_config(None)
    with pytest.raises(AttributeError, match="stpes"):
        config.train.stpes = 3
    config.train.steps = 3  # an existing field still takes a value
    assert config.train.steps == 3
    if "attention" in config.model:
        from attention import registry
        if config.model.attention in registry.names():
            assert set(registry.option_defaults(registry.get(config.model.attention))) \
                <= set(config.model)
