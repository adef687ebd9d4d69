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
import shutil
import time

import jax
import orbax.checkpoint as ocp

TMP_MARKER = ".orbax-checkpoint-tmp"
PARAMS = "nnx/0/"  # the model's arrays in a train state's names (by_name); "nnx/1/": optimizer


class UnreadableCheckpoint(RuntimeError):
    """A step whose files fail verification (missing, empty or unparsable files, data that
    does not decode): retrying cannot help. `step`, `path`, and `why` (one line)."""

    def __init__(self, step: int, path: str, why: str):
        super().__init__(f"checkpoint {step} ({path}): {why}")
        self.step, self.path, self.why = step, path, why


class CheckpointError(RuntimeError):
    """A checkpoint the run needs and cannot read for a reason other than its files (storage
    I/O after retries), or a workdir none of whose checkpoints is readable: the run stops with
    this message and nothing in the workdir is moved."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message', at most `limit` characters (TensorStore errors carry
    a whole JSON spec after the first line)."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[:limit - 3] + "..."


# TensorStore / absl status codes that a retry may clear (the rest, e.g. DATA_LOSS, NOT_FOUND,
# INVALID_ARGUMENT, FAILED_PRECONDITION, say the files themselves are wrong)
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                     "CANCELLED", "UNKNOWN: Connection", "Connection reset", "timed out")


def is_data_error(e: BaseException) -> bool:
    """Whether a read error says the checkpoint's data itself is bad (it does not decode, a
    file or key is missing, TensorStore reports DATA_LOSS / NOT_FOUND / INVALID_ARGUMENT...)
    rather than the storage: retrying will not help."""
    return (isinstance(e, (ValueError, KeyError, EOFError, FileNotFoundError, NotADirectoryError))
            and not is_transient(e))


def is_transient(e: BaseException) -> bool:
    """Whether a read error is of the storage rather than the files: an OSError other than a
    missing file or directory (EIO, ESTALE, EACCES on a flaky mount...), a timeout or a broken
    connection, or a TensorStore status a retry may clear. Looks down the exception chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (TimeoutError, ConnectionError, InterruptedError)):
            return True
        if isinstance(e, OSError) and not isinstance(
                e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return True
        if any(s in str(e) for s in _TRANSIENT_STATUS):
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpoints:
    """retries, retry_seconds: a read that fails is tried again `retries` times, waiting
    retry_seconds * 2**i before try i + 1 (a storage hiccup clears; corrupt files do not)."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 retries: int = 3, retry_seconds: float = 1.0):
        self.workdir = os.path.abspath(workdir)
        self.retries, self.retry_seconds = retries, retry_seconds
        self.retried: list[str] = []  # 'checkpoint N: error' of every read that needed a retry
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

    def save(self, step: int, state, data_position: dict | None, config_json: str) -> None:
        """data_position: the input's position (Trainer.data_position: the iterator's state, the
        examples consumed and the global batch size)."""
        args = {"state": ocp.args.StandardSave(state),
                "config": ocp.args.JsonSave(json.loads(config_json))}
        if data_position is not None:
            args["data"] = ocp.args.JsonSave(dict(data_position,
                                                  process_count=jax.process_count()))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def verify(self, step: int) -> list[str]:
        """What is wrong with checkpoint `step`'s files, without reading its arrays: a missing
        step, item or metadata file, metadata that is not JSON, empty files in state/ (a
        truncated write). [] when nothing is found (or the storage cannot be listed: that is not
        the files' fault)."""
        d = self.step_dir(step)
        try:
            if not os.path.isdir(d):
                return [f"{d} does not exist"]
            problems = [f"{item}/ is missing" for item in ("state", "config")
                        if not os.path.isdir(os.path.join(d, item))]
            meta = os.path.join(d, "state", "_METADATA")
            if not problems:
                if not os.path.isfile(meta):
                    problems.append("state/_METADATA is missing")
                else:
                    try:
                        with open(meta) as f:
                            json.load(f)
                    except ValueError:
                        problems.append("state/_METADATA is not valid JSON")
            empty = [os.path.relpath(os.path.join(root, f), d)
                     for root, _, files in os.walk(os.path.join(d, "state")) for f in files
                     if os.path.getsize(os.path.join(root, f)) == 0]
            if empty:
                problems.append(f"{len(empty)} empty file(s), e.g. {empty[0]}")
            return problems
        except OSError as e:
            if is_transient(e):
                return []
            raise

    def read(self, step: int, fn):
        """fn() (a read of checkpoint `step`). A failure whose step fails verification, or whose
        error says the data does not decode, raises UnreadableCheckpoint at once; any other
        (storage I/O, a timeout, an error of unknown kind) is retried with exponential backoff
        and, if every try fails, raises CheckpointError: nothing is moved for those."""
        for attempt in range(self.retries + 1):
            try:
                out = fn()
                if attempt:
                    self.retried.append(f"checkpoint {step}: {first_line(error)}")
                return out
            except (UnreadableCheckpoint, CheckpointError):
                raise
            except Exception as e:  # noqa: BLE001 - classified here
                error = e
            problems = self.verify(step)
            if not problems and is_data_error(error):
                problems = [first_line(error)]
            if problems:
                raise UnreadableCheckpoint(step, self.step_dir(step), "; ".join(problems)) \
                    from error
            if attempt < self.retries:
                time.sleep(self.retry_seconds * 2 ** attempt)
        raise CheckpointError(
            f"could not read checkpoint {step} ({self.step_dir(step)}) after {self.retries + 1} "
            f"tries: {first_line(error)}. Its files look complete, so this is taken for a "
            "storage problem: nothing was moved or skipped; rerun when the storage is back") \
            from error

    def params_only(self, step: int) -> bool:
        """Whether checkpoint `step` holds only model arrays ('nnx/0/...'), no optimizer state
        or counters: what write_params_checkpoint writes (trainer.convert import-hf); a run
        resumes it with a fresh optimizer at step 0."""
        saved = self.read(step, lambda: by_name(self.manager.item_metadata(step)["state"]))
        return bool(saved) and all(n.startswith(PARAMS) for n in saved)

    def mismatches(self, step: int, abstract_state) -> list[str]:
        """Arrays of `abstract_state` whose shape or presence differs in checkpoint `step`
        ('path: shape A in the checkpoint, B here'; of a params-only checkpoint, the arrays it
        holds, the others being fresh); reading the metadata fails as read() says."""
        saved = self.read(step, lambda: by_name(self.manager.item_metadata(step)["state"]))
        if not saved:
            raise UnreadableCheckpoint(step, self.step_dir(step), "no state metadata")
        ours = by_name(abstract_state)
        only = all(n.startswith(PARAMS) for n in saved)
        problems = []
        for name, a in ours.items():
            if name not in saved:
                if not only:
                    problems.append(f"{name}: missing in the checkpoint")
            elif tuple(saved[name].shape) != tuple(a.shape):
                problems.append(f"{name}: shape {tuple(saved[name].shape)} in the checkpoint, "
                                f"{tuple(a.shape)} here")
        problems += [f"{name}: in the checkpoint, not in this model"
                     for name in saved if name not in ours]
        return problems

    def restore(self, step: int, abstract_state, shardings) -> tuple[dict, dict | None]:
        """(state restored into `shardings` (the current mesh), the saved data position or None);
        a failing read is retried, then raises as read() says."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        args = {"state": ocp.args.StandardRestore(target)}
        if os.path.isdir(os.path.join(self.step_dir(step), "data")):
            args["data"] = ocp.args.JsonRestore()

        def restore():
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            return jax.block_until_ready(restored["state"]), restored.get("data")
        return self.read(step, restore)

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

    def restore_flat(self, step: int, sharding_for, on_data_position=None
                     ) -> dict[str, "jax.Array"]:
        """Every array of checkpoint `step`, whatever the model was, as {name: array} with the
        names of `by_name` ('nnx/0/blocks/0/attn/q/kernel', 'nnx/1/opt_state/...', 'step').
        Each is placed with `sharding_for(name, shape)` (so a run on another mesh restores
        straight into its own layout); on_data_position, if given, is called with the saved
        data position (Trainer.data_position)."""
        meta = self.read(step, lambda: self.manager.item_metadata(step)["state"])
        target = jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                 sharding=sharding_for(path_name(path), m.shape)),
            meta)
        args = {"state": ocp.args.StandardRestore(target)}
        if on_data_position is not None:
            args["data"] = ocp.args.JsonRestore()
        restored = self.read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**args)))
        if on_data_position is not None:
            on_data_position(restored["data"])
        return by_name(restored["state"])

    def restore_config(self, step: int) -> dict:
        """The resolved config saved with checkpoint `step` (a JSON dict), read as read() says."""
        return self.read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

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


def write_params_checkpoint(workdir: str, step: int, arrays, config_json: str) -> str:
    """Writes checkpoint `step` of workdir holding only model arrays, one at a time: `arrays`
    yields (name, jax.Array) with names as by_name gives them without the 'nnx/0/' prefix
    ('blocks/0/attn/q_proj/kernel'); each is saved (Orbax partial saving) before the next is
    read, so the host holds one array at a time, never the model. Written under
    workdir/checkpoints.import-tmp and renamed into place at the end (an interrupted write
    leaves no checkpoint). Returns the step's directory."""
    import orbax.checkpoint.experimental.v1 as ocp1  # (the partial-saving API: here only)

    final = os.path.join(workdir, "checkpoints", str(step))
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists")
    tmp = os.path.join(workdir, "checkpoints.import-tmp", str(step))
    if os.path.isdir(os.path.dirname(tmp)):
        shutil.rmtree(os.path.dirname(tmp))  # a previous interrupted import's
    os.makedirs(os.path.dirname(tmp))
    for name, array in arrays:
        tree: dict = {}
        node = tree
        parts = ["nnx", "0", *name.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = array
        # uncompressed: a compressed array's chunks are held until its write commits (a second
        # copy of the tensor in memory); float weights barely compress anyway
        with ocp1.Context(array_options=ocp1.options.ArrayOptions(
                saving=ocp1.options.ArrayOptions.Saving(use_compression=False))):
            ocp1.partial.save(tmp, tree)
        del tree, node, array
    ocp1.partial.finalize(tmp)
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(os.path.join(tmp, "config"),
                                                        json.loads(config_json))
    # the metadata names the handlers a CheckpointManager reads these items with (ours)
    meta_path = os.path.join(tmp, "_CHECKPOINT_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["item_handlers"] = {
        "state": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
                 "StandardCheckpointHandler",
        "config": "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(tmp, final)
    os.rmdir(os.path.dirname(tmp))
    return final
