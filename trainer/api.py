"""The one way to reopen a run: a trained model (or a whole Trainer) back from a run directory.

    from trainer import load_checkpoint, generate
    model, config = load_checkpoint("runs/tiny")        # newest checkpoint; step=N for another
    tokens = generate(model, prompt, 64, temperature=0.7, top_k=40)   # (language models)

    run = open_run("runs/tiny")          # a Trainer restored on the run (tools: prune, ACT search)

Works for every family: the model is rebuilt from the config saved with the checkpoint (its
Task), so nothing but the run directory is needed. The family tools (`python -m trainer.prune`,
`trainer.track`, ACT's head search) reopen their `--from` run through these functions.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
from flax import nnx
from ml_collections import ConfigDict

from trainer.checkpoint import Checkpoints, path_name
from trainer.cli import apply_overrides, load_config
from trainer.config import ConfigError, from_json
from trainer.task import get_task
from trainer.trainer import Trainer


def run_dir(source: str) -> str:
    """The workdir of a run given as its workdir, its checkpoints/ or one step's directory;
    FileNotFoundError naming the path when none of them holds checkpoints/."""
    path = os.path.abspath(os.fspath(source).rstrip("/"))
    for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isdir(os.path.join(d, "checkpoints")):
            return d
    what = (f"{source!r} does not exist; expected a run's workdir holding checkpoints/"
            if not os.path.exists(path) else
            f"{source!r} is not a run directory: expected {os.path.join(path, 'checkpoints')}")
    raise FileNotFoundError(f"{what} (no checkpoint there; a run's checkpoints are written by "
                            "Trainer(config, workdir).fit() or python -m trainer.main "
                            "--workdir=...)")


def checkpoint_step(workdir: str, step: int | None = None) -> int:
    """`step` if the run holds it, else ValueError listing the steps it holds; None: the newest
    (FileNotFoundError when there is none)."""
    checkpoints = Checkpoints(workdir, async_save=False)
    try:
        steps = checkpoints.all_steps()
    finally:
        checkpoints.close()
    directory = os.path.join(workdir, "checkpoints")
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory} (a run writes one every "
                                "checkpoint.every steps and at its end)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {directory}; it holds steps "
                         f"{', '.join(map(str, steps))}")
    return step


def as_tuples(value):
    if isinstance(value, list):
        return tuple(as_tuples(v) for v in value)
    return value


def _overlay(config, saved: dict, prefix: str = "") -> None:
    """Sets every field of the saved (JSON) config on `config`, adding those it lacks."""
    for key, value in saved.items():
        if isinstance(value, dict):
            if key not in config or not isinstance(config[key], ConfigDict):
                with config.unlocked():
                    config[key] = ConfigDict()
            _overlay(config[key], value, f"{prefix}{key}.")
            continue
        value = as_tuples(value)
        try:
            if key in config:
                config[key] = value
            else:
                with config.unlocked():
                    config[key] = value
        except TypeError as e:
            raise ConfigError(f"config.{prefix}{key}: the run's saved value {value!r} does not fit "
                              f"the config file's field ({e})") from None


def run_config(workdir: str, step: int | None = None, *, spec: str | None = None,
               overrides: Sequence[str] = ()) -> ConfigDict:
    """The locked config saved with checkpoint `step` (None: the newest) of `workdir`; with
    `spec` (a config file[:variant]) laid over that file's defaults, so fields added to the file
    since the run was saved exist; then the `a.b=value` overrides."""
    step = checkpoint_step(workdir, step)
    checkpoints = Checkpoints(workdir, async_save=False)
    try:
        saved = checkpoints.restore_config(step)
    finally:
        checkpoints.close()
    if spec is None:
        config = from_json(json.dumps(saved))
        config.lock()
    else:
        config = load_config(spec)
        _overlay(config, saved)
    return apply_overrides(config, overrides)


def load_checkpoint(workdir: str, step: int | None = None, *, config: ConfigDict | None = None
                    ) -> tuple[nnx.Module, ConfigDict]:
    """(model, config) of a run: the NNX model with the parameters of checkpoint `step` (default:
    the newest), in eval mode (dropout off, no state updates) on one device, and the resolved
    ConfigDict saved with that checkpoint (locked, like load_config's). `config`: build this
    config's model instead (e.g. a tool's --config with overrides); its parameters must match.

    `workdir` is a Trainer's workdir (`--workdir` of `python -m trainer.main`), the directory
    holding `checkpoints/` (or that directory, or one step's). Raises FileNotFoundError naming the path when it is not a run
    directory or holds no checkpoint, and ValueError for a step it does not hold or a model
    the checkpoint does not match."""
    try:
        root = run_dir(workdir)
        step = checkpoint_step(root, step)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"load_checkpoint: {e}") from None
    if config is None:
        config = run_config(root, step)
    task = get_task(config.task)(config)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.seed))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpoints = Checkpoints(root, async_save=False)
    try:
        # every array of the train state, by name ('nnx/0/<model path>', 'nnx/1/<optimizer>')
        flat = checkpoints.restore_flat(step, lambda name, shape: device)
        where = checkpoints.step_dir(step)
    finally:
        checkpoints.close()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = ["nnx/0/" + path_name(path) for path, _ in leaves]
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(f"load_checkpoint: {where} does not match the model its config builds; "
                         f"missing: {', '.join(n[6:] for n in missing[:10])}"
                         + (" ..." if len(missing) > 10 else ""))
    state = jax.tree_util.tree_unflatten(
        treedef, [flat[n].astype(a.dtype) for n, (_, a) in zip(names, leaves)])
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, config


@dataclasses.dataclass
class OpenRun:
    """A trained run reopened by a Trainer on its workdir (nothing is written there)."""
    config: ConfigDict  # the run's config (locked)
    trainer: Trainer  # restored to the newest checkpoint
    model: nnx.Module
    step: int
    workdir: str

    @property
    def task(self):
        return self.trainer.task


def open_run(spec: str | None, overrides: Sequence[str], source: str, *, quiet: bool = True,
             check: Callable | None = None) -> OpenRun:
    """The run at `source` (see run_dir) with its config (run_config: the saved one over
    `spec`'s defaults, then the overrides), its newest checkpoint restored by a Trainer.
    check(config), if given, runs before anything is restored."""
    workdir = run_dir(source)
    config = run_config(workdir, spec=spec, overrides=overrides)
    if check is not None:
        check(config)
    trainer = Trainer(config, workdir, quiet=quiet)
    return OpenRun(config=config, trainer=trainer, model=trainer.model, step=trainer.step,
                   workdir=workdir)
