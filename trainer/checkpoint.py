"""Orbax checkpoints of a run: train state, data position and the resolved config.

One CheckpointManager per workdir (`workdir/checkpoints/<step>/{state,data,config}`). Saves are
asynchronous (device arrays are copied to host before `save` returns, so the next step may
donate them) and atomic (Orbax writes to a temporary directory and renames it when complete, so
a save interrupted by a crash leaves only a `*.orbax-checkpoint-tmp*` directory, never a step).
Restores target the shardings of the current mesh, which reshards a run onto another mesh.

The data position is saved as JSON (the input iterator's state of process 0). The Trainer's
per-process pipelines are built so that all processes are at the same position whatever their
number (trainer.data.process_batches), so a checkpoint written by N processes restores in M.
"""
from __future__ import annotations

import json
import os
import time

import jax
import orbax.checkpoint as ocp

TMP_MARKER = ".orbax-checkpoint-tmp"


class UnreadableCheckpoint(RuntimeError):
    """A step directory that exists but cannot be restored (truncated, corrupted, partial)."""


class Checkpoints:
    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True,
                enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def incomplete(self) -> list[str]:
        """Directories of saves that never completed (the process died while writing them)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(os.path.join(self.directory, d) for d in os.listdir(self.directory)
                      if TMP_MARKER in d)

    def save(self, step: int, state, data_iter, config_json: str) -> None:
        args = {"state": ocp.args.StandardSave(state),
                "config": ocp.args.JsonSave(json.loads(config_json))}
        if data_iter is not None:
            args["data"] = ocp.args.JsonSave({"iterator": data_iter.get_state(),
                                              "process_count": jax.process_count()})
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def mismatches(self, step: int, abstract_state) -> list[str]:
        """Arrays of `abstract_state` whose shape or presence differs in checkpoint `step`
        ('path: shape A in the checkpoint, B here'); raises UnreadableCheckpoint when the
        checkpoint's metadata cannot be read."""
        try:
            meta = self.manager.item_metadata(step)["state"]
            saved = by_name(meta)
        except Exception as e:  # noqa: BLE001 - any failure to read means the same to the caller
            raise UnreadableCheckpoint(f"{self.step_dir(step)}: {type(e).__name__}: {e}") from e
        if not saved:
            raise UnreadableCheckpoint(f"{self.step_dir(step)}: no state metadata")
        ours = by_name(abstract_state)
        problems = []
        for name, a in ours.items():
            if name not in saved:
                problems.append(f"{name}: missing in the checkpoint")
            elif tuple(saved[name].shape) != tuple(a.shape):
                problems.append(f"{name}: shape {tuple(saved[name].shape)} in the checkpoint, "
                                f"{tuple(a.shape)} here")
        problems += [f"{name}: in the checkpoint, not in this model"
                     for name in saved if name not in ours]
        return problems

    def restore(self, step: int, abstract_state, shardings, data_iter=None):
        """Restores the state into `shardings` (the current mesh) and the iterator in place;
        raises UnreadableCheckpoint when the step's files cannot be read."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            args["data"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            if data_iter is not None:
                data_iter.set_state(restored["data"]["iterator"])
            jax.block_until_ready(restored["state"])
        except Exception as e:  # noqa: BLE001
            raise UnreadableCheckpoint(f"{self.step_dir(step)}: {type(e).__name__}: {e}") from e
        return restored["state"]

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def set_aside(self, step: int) -> str:
        """Moves an unreadable step out of the way (to workdir/checkpoints.unreadable/), keeping
        its files for inspection, so that later saves of the same step do not collide with it.
        Process 0 moves it; every process waits for that. Returns the new location."""
        dest = os.path.join(self.workdir, "checkpoints.unreadable",
                            f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(self.step_dir(step), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"polyformer set aside checkpoint {step}")
        self.manager.reload()
        return dest

    def restore_params(self, step: int, mesh) -> dict[str, "jax.Array"]:
        """The model parameters of checkpoint `step` as {path: array}, whatever the model was.

        Paths are '/'-joined keys of the model's state ('blocks/0/attn/q_proj/kernel'); arrays come
        back replicated on `mesh` (a run initialised from another is small enough for that, and
        the caller reshards what it keeps).
        """
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        flat = self.restore_flat(step, lambda name, shape: rep)
        return {name[len("nnx/0/"):]: a for name, a in flat.items() if name.startswith("nnx/0/")}

    def restore_flat(self, step: int, sharding_for, data_iter=None) -> dict[str, "jax.Array"]:
        """Every array of checkpoint `step`, whatever the model was, as {name: array} with the
        names of `by_name` ('nnx/0/blocks/0/attn/q/kernel', 'nnx/1/opt_state/...', 'step').
        Each is placed with `sharding_for(name, shape)` (so a run on another mesh restores
        straight into its own layout); `data_iter`, if given, gets the saved data position."""
        meta = self.manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                 sharding=sharding_for(path_name(path), m.shape)),
            meta)
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None:
            data_iter.set_state(restored["data"]["iterator"])
        return by_name(restored["state"])

    def restore_config(self, step: int) -> dict:
        """The resolved config saved with checkpoint `step` (a JSON dict)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def path_name(path) -> str:
    """'a/b/c' of a pytree key path, the NNX Variable's trailing 'value' wrapper dropped (only
    the last key: a submodule may be called 'value', e.g. nnx.MultiHeadAttention's)."""
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return "/".join(keys)


def by_name(tree) -> dict:
    """{'a/b/c': leaf} of a (metadata or abstract) state tree, NNX 'value' wrappers dropped."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
