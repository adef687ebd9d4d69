"""The Python API beyond the Trainer: a trained model back from a run directory.

    from trainer import load_checkpoint, generate
    model, config = load_checkpoint("runs/tiny")        # newest checkpoint; step=N for another
    tokens = generate(model, prompt, 64, temperature=0.7, top_k=40)   # (language models)

Works for every family: the model is rebuilt from the config saved with the checkpoint (its
Task), so nothing but the run directory is needed.
"""
from __future__ import annotations

import json
import os

import jax
from flax import nnx
from ml_collections import ConfigDict

from trainer.checkpoint import Checkpoints, path_name
from trainer.config import from_json
from trainer.task import get_task


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[nnx.Module, ConfigDict]:
    """(model, config) of a run: the NNX model with the parameters of checkpoint `step` (default:
    the newest), in eval mode (dropout off, no state updates) on one device, and the resolved
    ConfigDict saved with that checkpoint (locked, like load_config's).

    `workdir` is a Trainer's workdir (`--workdir` of `python -m trainer.main`), the directory
    holding `checkpoints/`. Raises FileNotFoundError naming the path when it is not a run
    directory or holds no checkpoint, and ValueError for a step it does not hold."""
    workdir = os.fspath(workdir)
    root = os.path.abspath(workdir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"load_checkpoint: {workdir!r} does not exist; expected a run "
                                "directory (a Trainer's workdir, holding checkpoints/)")
    directory = os.path.join(root, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"load_checkpoint: {workdir!r} is not a run directory: expected {directory} (written "
            "by Trainer(config, workdir).fit() or python -m trainer.main --workdir=...)")
    checkpoints = Checkpoints(root, async_save=False)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise FileNotFoundError(f"load_checkpoint: no checkpoint in {directory} (a run "
                                    "writes one every checkpoint.every steps and at its end)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"load_checkpoint: no checkpoint of step {step} in {directory}; "
                             f"it holds steps {', '.join(map(str, steps))}")
        config = from_json(json.dumps(checkpoints.restore_config(step)))
        config.lock()
        task = get_task(config.task)(config)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.seed))))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # every array of the train state, by name ('nnx/0/<model path>', 'nnx/1/<optimizer>')
        flat = checkpoints.restore_flat(step, lambda name, shape: device)
    finally:
        checkpoints.close()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = ["nnx/0/" + path_name(path) for path, _ in leaves]
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(f"load_checkpoint: {checkpoints.step_dir(step)} does not match the model "
                         f"its config builds; missing: {', '.join(n[6:] for n in missing[:10])}"
                         + (" ..." if len(missing) > 10 else ""))
    state = jax.tree_util.tree_unflatten(
        treedef, [flat[n].astype(a.dtype) for n, (_, a) in zip(names, leaves)])
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, config
