"""A schedule of runs in one command: `config.stages`.

    python -m trainer.main --config=configs/tokenformer.py:grow --workdir=runs/grow

`config.stages` is a tuple of dicts of field overrides, e.g.
    ({"train.steps": 100},
     {"model.param_tokens": 128, "model.ffn_param_tokens": 256, "train.steps": 200})
Stage i is the config with its overrides, trained by an ordinary Trainer in <workdir>/stage_<i>;
stage i > 1 initialises from stage i - 1's final checkpoint (`init_from`, with what the config's
`init_from_carry` says: TokenFormer growth carries the optimizer state and continues the step).
Every stage is checkpointed in its own directory, so rerunning the command skips the finished
stages and resumes the interrupted one. Nothing here knows a family: a stage is a config, and
runs() expands and checks them all (trainer.cli.check) before the first one trains.
"""
from __future__ import annotations

import copy
import json
import os

from ml_collections import ConfigDict

from trainer.cli import apply_overrides, check
from trainer.config import ConfigError, to_json
from trainer.task import get_task
from trainer.trainer import Trainer

_NOT_PER_STAGE = ("stages", "init_from")


def stage_configs(config: ConfigDict) -> list[ConfigDict]:
    """The checked, locked config of every stage of config.stages (stage i > 1 with init_from
    unset: trainer.stages.fit_stages points it at the previous stage's workdir); a bad stage
    raises ConfigError naming it."""
    if not isinstance(config.stages, (tuple, list)) or not config.stages:
        raise ConfigError("config.stages must be a non-empty list of dicts of field overrides")
    base = copy.deepcopy(config)
    base.stages = ()
    out = []
    for i, overrides in enumerate(config.stages, 1):
        where = f"config.stages[{i - 1}]"
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where} must be a dict of field overrides such as "
                              f"{{'train.steps': 100}}, got {overrides!r}")
        bad = [k for k in overrides if k in _NOT_PER_STAGE]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} cannot be set per stage (stage 1 uses "
                              "config.init_from; later stages start from the previous one)")
        c = copy.deepcopy(base)
        try:
            apply_overrides(c, overrides)
            if i > 1:
                c.init_from = ""
            check(c)
            if out:  # the family's own check of growing from the previous stage, before training
                get_task(c.task)(c).check_init_from(json.loads(to_json(out[-1])))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        out.append(c)
    return out


def stage_dir(workdir: str, i: int) -> str:
    return os.path.join(workdir, f"stage_{i}")


def runs(config: ConfigDict, workdir: str) -> list[tuple[ConfigDict, str]]:
    """[(config, workdir)] of every run `config` describes, each checked: one, or one per stage
    (in <workdir>/stage_<i>, stage i > 1 initialised from stage i - 1)."""
    if not config.stages:
        check(config)
        return [(config, workdir)]
    out = []
    for i, c in enumerate(stage_configs(config), 1):
        if i > 1:
            c.init_from = stage_dir(workdir, i - 1)
        out.append((c, stage_dir(workdir, i)))
    return out


def fit_stages(config, workdir: str, *, devices=None, quiet: bool = False,
               max_steps: int | None = None, planned=None, stop=None) -> list[dict]:
    """Trains the stages in order (skipping finished ones); returns each stage's fit() result.
    max_steps stops (with a checkpoint) inside the stage that reaches it; a rerun goes on.
    planned: runs(config, workdir) when the caller already expanded and checked them; stop:
    the caller's trainer.signals.StopSignals (each stage's fit() makes its own otherwise)."""
    stages = runs(config, workdir) if planned is None else planned
    results = []
    for i, (c, d) in enumerate(stages, 1):
        with Trainer(c, d, devices=devices, quiet=quiet, checked=True) as t:
            done = t.checkpoints.latest_step()
            if done is not None and done >= c.train.steps:
                t._log(f"stage {i}/{len(stages)}: finished earlier (checkpoint {done} in {d})")
                results.append({"step": done, "workdir": d, "skipped": True})
                continue
            t._log(f"stage {i}/{len(stages)}: {t.num_params():,} parameters, to step "
                   f"{c.train.steps}, workdir {d}")
            result = t.fit(max_steps=max_steps, stop=stop)
            result.update(workdir=d, growth=dict(t.growth), step_flops=t.step_flops)
            results.append(result)
            if result.get("preempted") or result["step"] < c.train.steps:
                break  # stopped early: a rerun resumes this stage
    return results
