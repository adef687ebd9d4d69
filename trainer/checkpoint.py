"""Orbax checkpoints of a run: train state, Grain iterator position and the resolved config.

One CheckpointManager per workdir (`workdir/checkpoints/<step>/{state,data,config}`). Saves are
asynchronous (device arrays are copied to host before `save` returns, so the next step may
donate them) and atomic (Orbax writes to a temporary directory and renames it when complete).
Restores target the shardings of the current mesh.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True,
                enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter, config_json: str) -> None:
        args = {"state": ocp.args.StandardSave(state),
                "config": ocp.args.JsonSave(json.loads(config_json))}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state, shardings, data_iter=None):
        """Restores the state into `shardings` (the current mesh) and the iterator in place."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_params(self, step: int, mesh) -> dict[str, "jax.Array"]:
        """The model parameters of checkpoint `step` as {path: array}, whatever the model was.

        Paths are '/'-joined keys of the model's state ('blocks/0/attn/q_proj/kernel'); arrays come
        back replicated on `mesh` (a run initialised from another is small enough for that, and
        the caller reshards what it keeps).
        """
        meta = self.manager.item_metadata(step)["state"]
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep), meta)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        flat = jax.tree_util.tree_flatten_with_path(restored["state"]["nnx"]["0"])[0]
        out = {}
        for path, value in flat:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            out["/".join(k for k in keys if k != "value")] = value
        return out

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
