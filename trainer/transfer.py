"""Initialising a run from another run's checkpoint (config.init_from): what transfers
(config.init_from_carry), arrays matched by name and read straight into this run's layout,
grown through the Task's adapt_init_from (TokenFormer's parameter tokens), and the growth
report. `init_from(trainer, source, state)` is called by the Trainer when a fresh run starts.
"""
from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from trainer.checkpoint import Checkpoints, by_name, path_name
from trainer.config import ConfigError, to_json
from trainer.data import global_batch, process_batches
from trainer.sharding import replicated
from trainer.task import get_task, loss_with_aux


def init_from(trainer, source: str, state):
    """This run's fresh `state` initialised from another run's newest checkpoint.

    What transfers is config.init_from_carry: "params" (optimizer and step start fresh),
    "params+optimizer" (the Adam moments and bias-correction count carry over; the step and
    the learning-rate schedule restart at 0), or "params+optimizer+step" (the step, the
    schedule and, when the data pipeline is the same, the data position continue).

    Arrays are matched by path. One whose shape differs goes through the Task's
    adapt_init_from (TokenFormer appends parameter tokens: zero keys, freshly initialised
    values, zero moments); anything unmatched is an error naming it. The source may have run
    on another mesh: every array is read straight into this run's layout. When arrays grew,
    a log line reports the parameter counts and the loss on a fixed eval batch before and
    after (equal when the growth preserves the function), also kept in trainer.growth.
    """
    src_dir = source if os.path.isdir(os.path.join(source, "checkpoints")) else os.path.dirname(
        os.path.abspath(source).rstrip("/"))
    src = Checkpoints(src_dir, async_save=False)
    try:
        src_step = src.latest_step()
        if src_step is None:
            raise ConfigError(f"config.init_from: no checkpoint in {source!r}")
        src_config = src.restore_config(src_step)
        trainer.task.check_init_from(src_config)
        carry = trainer.config.init_from_carry
        with_opt, with_step = "optimizer" in carry, carry.endswith("+step")
        if with_step and src_step >= trainer.config.train.steps:
            raise ConfigError(
                f"config.init_from_carry={carry!r} continues at the source's step {src_step}, "
                f"but train.steps={trainer.config.train.steps} leaves nothing to train; set "
                "train.steps to the total over both runs")
        # the same stream goes on at the next example (whatever the global batch sizes)
        same_data = src_config.get("data") == json.loads(to_json(trainer.config))["data"]
        carry_data = with_step and same_data
        flat = src.restore_flat(src_step, _sharding_for_source(trainer),
                                (lambda p: setattr(trainer, "data_position", p))
                                if carry_data else None)
    finally:
        src.close()

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    param_names = {"nnx/0/" + "/".join(map(str, p)) for p, v in
                   nnx.to_flat_state(trainer.abstract_state.nnx[0]) if isinstance(v, nnx.Param)}
    # restart: the optimizer's step and the schedule's count start at 0 (fresh values);
    # Adam's own count stays, its bias correction belongs to the carried moments
    fresh = set() if with_step else {"nnx/1/step", *_schedule_counts(trainer)}
    new_ok = re.compile(trainer.config.init_from_new) if trainer.config.init_from_new else None
    skip = re.compile(trainer.config.init_from_skip) if trainer.config.init_from_skip else None
    problems, grown, kept, skipped, out = [], [], [], [], []
    for path, leaf in leaves:
        name = path_name(path)
        short = name.split("/", 2)[-1] if name.startswith("nnx/") else name
        if not (name in param_names or (with_opt and name.startswith("nnx/1/")
                                        and name not in fresh) or (with_step and name == "step")):
            out.append(leaf)
            continue
        if skip is not None and skip.search(short):
            skipped.append(short)  # e.g. a classifier for another label set: fresh init
            out.append(leaf)
            continue
        value = flat.get(name)
        if value is None:
            if new_ok is not None and new_ok.search(short):
                kept.append(short)  # a parameter (or its moment) the source does not have
            elif name in param_names:
                problems.append(f"{short}: missing in the source (config.init_from_new lets "
                                "named new parameters keep their initial values)")
            else:
                problems.append(f"optimizer state {short}: missing in the source (its "
                                "optimizer differs; init_from_carry='params' starts a fresh one)")
            out.append(leaf)
            continue
        if value.shape != leaf.shape:
            adapted = trainer.task.adapt_init_from(short, value, leaf)
            if adapted is None:
                problems.append(f"{short}: shape {value.shape} in the source, {leaf.shape} here"
                                f" (the {trainer.config.task!r} task maps only equal shapes)")
                out.append(leaf)
                continue
            grown.append(short)
            value = adapted
        out.append(jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding))
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(f"config.init_from: {source} (step {src_step}) does not match this "
                          "model:\n  " + "\n  ".join(problems[:20]) + more)
    new_state = jax.tree_util.tree_unflatten(treedef, out)
    if kept:
        trainer._log(f"init_from: {len(kept)} new arrays keep their initial values "
                  f"({kept[0]}{', ...' if len(kept) > 1 else ''})")
    if skipped:
        trainer._log(f"init_from: {len(skipped)} arrays not loaded (config.init_from_skip), "
                  f"initialised afresh ({skipped[0]}{', ...' if len(skipped) > 1 else ''})")
    what = {"params": "parameters", "params+optimizer": "parameters and optimizer state",
            "params+optimizer+step": f"parameters, optimizer state and step {src_step}"}[carry]
    if with_step and not same_data:
        what += " (the data position restarts: the source's data or batch differ)"
    trainer._log(f"initialised {what} from {src.directory}/{src_step}")
    if grown and trainer.task.init_from_adaptation == "growth":
        trainer.growth = _growth_report(trainer, src_config, flat, new_state, grown)
    elif grown:  # the inputs changed with the shapes: no loss to compare
        trainer._log(f"init_from: {trainer.task.init_from_adaptation}: {len(grown)} arrays "
                     f"adapted ({grown[0]}{', ...' if len(grown) > 1 else ''})")
    return new_state

def _sharding_for_source(trainer):
    """sharding_for(name, shape) of a source array: this run's sharding of the array of the
    same name where it divides the source's shape, else replicated (a grown array is
    adapted, then placed)."""
    ours = by_name(trainer.state_shardings)
    rep = replicated(trainer.mesh)

    def sharding_for(name, shape):
        s = ours.get(name, rep)
        try:
            s.shard_shape(tuple(shape))
        except ValueError:
            return rep
        return s
    return sharding_for

def _schedule_counts(trainer) -> set[str]:
    """Names of the learning-rate schedule's step counters in the optimizer state."""
    params = nnx.state(trainer._abstract_model, trainer.trainable)
    raw = jax.eval_shape(trainer.tx.init, params)
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return {f"nnx/1/opt_state/{path_name(p)}/count" for p, x in
            jax.tree_util.tree_flatten_with_path(raw, is_leaf=is_sched)[0] if is_sched(x)}

def _growth_report(trainer, src_config: dict, flat: dict, new_state, grown: list[str]) -> dict:
    """Parameter counts and the loss on the first eval micro-batch of the source model
    (built from its saved config) and of the grown one, logged in one line."""
    from ml_collections import ConfigDict

    src_task = get_task(src_config["task"])(ConfigDict(src_config))
    gdef, abstract = nnx.split(nnx.eval_shape(lambda: src_task.build_model(nnx.Rngs(0))))
    old_params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(abstract)
                     if isinstance(v, nnx.Param))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    src_state = jax.tree_util.tree_unflatten(treedef, [flat["nnx/0/" + path_name(p)] for p, _ in leaves])
    local = next(iter(process_batches(trainer.task.eval_data(), trainer.micro_batch, prefetch=0)))
    batch = global_batch(local, trainer._batch_shardings(local, leading=0))

    def src_loss(state, batch):
        model = nnx.merge(gdef, state)
        model.eval()
        return loss_with_aux(src_task, model, batch)[0]

    note = ""
    with jax.set_mesh(trainer.mesh):
        try:
            before = float(jax.jit(src_loss)(src_state, batch))
        except (TypeError, ValueError):  # e.g. a head for another label set (init_from_skip)
            before, note = float("nan"), " (the source model cannot take this run's batch)"
        after = float(jax.jit(trainer._eval_step_fn)(new_state, batch)[0]["loss"])
    report = {"params_before": old_params, "params_after": trainer.num_params(),
              "loss_before": before, "loss_after": after, "grown": grown}
    trainer._log(f"growth: {len(grown)} arrays grew ({grown[0]}, ...); parameters "
              f"{old_params:,} -> {trainer.num_params():,}; loss on a fixed eval batch "
              f"{before:.6f} before{note}, {after:.6f} after")
    # "not <=": a NaN or infinite loss after growth is the most changed function of all
    if math.isfinite(before) and not abs(after - before) <= GROWTH_LOSS_RTOL * max(abs(before),
                                                                                   1.0):
        # a growth meant to continue the source's function (the task's adapt_init_from says how
        # arrays grow) that does not: said where it cannot be missed, with the measured change
        trainer._warn(f"init_from: the grown model does not compute the source's function: loss "
                      f"on a fixed eval batch {before:.6f} before growth, {after:.6f} after")
    return report


# |loss after - loss before| / max(|loss before|, 1) above which a growth changed the function
# (a function-preserving one differs by float rounding: ~1e-7 in the TokenFormer tests)
GROWTH_LOSS_RTOL = 1e-4
