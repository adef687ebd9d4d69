"""The generic, sharded training loop. Knows nothing about any family: the Task does.

    trainer = Trainer(config, workdir)
    trainer.fit()                 # train to config.train.steps, resuming from workdir if possible
    trainer.fit(max_steps=50)     # ... or stop (and checkpoint) at step 50; a later fit() goes on
    trainer.evaluate()            # eval metrics of the current state
    trainer.model                 # the NNX model (for notebooks: sampling, attention maps)

The train state is one pytree, {"nnx": nnx.State of (model, optimizer), "step", "nonfinite",
"first_nonfinite"}, sharded by the logical-axis rules, donated to the jitted step and pinned to
the same shardings on the way out so the step compiles exactly once.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import platform as kernel_platform
from trainer import perf
from trainer.checkpoint import Checkpoints, UnreadableCheckpoint, by_name, path_name
from trainer.cli import check
from trainer.config import ConfigError, to_json
from trainer.data import global_batch, process_batches
from trainer.logs import Reporter
from trainer.optim import lr_schedule, make_optimizer
from trainer.sharding import BATCH_AXES, make_mesh, mesh_shape, replicated, state_shardings
from trainer.task import get_task, loss_with_aux


class Trainer:
    def __init__(self, config, workdir: str, *, devices=None, quiet: bool = False,
                 dry_run: bool = False, checked: bool = False):
        """dry_run: collect divisibility problems in self.problems instead of raising, and
        touch nothing on disk (see `dry_run()`). checked: the config already passed
        trainer.cli.check (trainer.cli.runs does it for every run of a command)."""
        if not checked:
            check(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.quiet = quiet
        self.task = get_task(config.task)(config)
        self.problems: list[str] = []

        def problem(error: ConfigError) -> None:
            if not dry_run:
                raise error
            self.problems.append(str(error))

        devices = list(devices) if devices is not None else jax.devices()
        self.mesh_sizes = mesh_shape(config, len(devices))
        try:
            self.task.validate(self.mesh_sizes)
        except ConfigError as e:
            problem(e)
        t = config.train
        self.accum = t.grad_accum_steps
        self.micro_batch = t.global_batch_size // self.accum
        dp = self.mesh_sizes["data"] * self.mesh_sizes["fsdp"]
        if self.micro_batch % dp:
            problem(ConfigError(
                f"config.train.global_batch_size={t.global_batch_size} "
                f"(/ grad_accum_steps={self.accum} = {self.micro_batch} per micro-batch) is not "
                f"divisible by the data-parallel size mesh.data x mesh.fsdp = {dp}"))
        self.warnings: list[str] = []  # the dry run's non-blocking findings
        if not self.problems:
            try:
                self._check_eval_size()
            except ConfigError as e:
                if not dry_run:
                    raise
                self.warnings.append(str(e))  # evaluation only: the train step still compiles
        self.mesh = make_mesh(config, devices)

        self.tx = make_optimizer(config)
        self.schedule = lr_schedule(config)
        abstract = nnx.eval_shape(self._build)  # outside the mesh: names are logical here
        self._abstract_model = abstract[0]
        self.graphdef, abstract_nnx = nnx.split(abstract)
        self._num_params = sum(math.prod(x.shape)
                               for x in jax.tree.leaves(nnx.state(abstract[0], nnx.Param)))
        self._num_trainable = sum(math.prod(x.shape) for x in
                                  jax.tree.leaves(nnx.state(abstract[0], self.trainable)))
        if config.train.trainable and not jax.tree.leaves(nnx.state(abstract[0], self.trainable)):
            names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(
                nnx.state(abstract[0], nnx.Param))]
            raise ConfigError(f"config.train.trainable={config.train.trainable!r} matches no "
                              f"parameter; parameters are named like {', '.join(names[:4])}, ...")
        try:
            nnx_shardings = state_shardings(abstract_nnx, self.mesh)
        except ConfigError as e:  # parameters the mesh does not divide
            problem(e)
            nnx_shardings = state_shardings(abstract_nnx, self.mesh, on_problem="replicate")
        rep = replicated(self.mesh)
        self.state_shardings = {"nnx": nnx_shardings, "step": rep, "nonfinite": rep,
                                "first_nonfinite": rep}
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract_state = {"nnx": abstract_nnx, "step": scalar, "nonfinite": scalar,
                               "first_nonfinite": scalar}
        self.checkpoints = None if dry_run else Checkpoints(
            self.workdir, max_to_keep=config.checkpoint.max_to_keep,
            async_save=config.checkpoint.async_save)
        self.state = None
        self.train_iter = None
        self._train_step = None  # AOT-compiled on the first batch
        self._eval_step = None
        self.step_flops = float("nan")
        self.plan: dict = {}  # dry_run()'s figures
        self.growth: dict = {}  # _init_from's report when it grew arrays
        self.last_eval: dict[str, float] = {}
        self.last_eval_images: dict[str, np.ndarray] = {}
        self._sharding_cache: dict = {}

    def _abstract_sharded_state(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def dry_run(self) -> str:
        """A report, without training or allocating the state: every parameter's shape,
        PartitionSpec and bytes per device; per-device bytes of parameters and optimizer state;
        the divisibility problems; and, when there are none, the compiled train step's memory
        analysis and FLOPs."""
        from flax import nnx as _nnx

        lines = [f"dry run: task {self.config.task}, mesh {self.mesh_sizes} over "
                 f"{self.mesh.size} {self.mesh.devices.flat[0].platform} devices"]
        model_state, opt_state = self.abstract_state["nnx"][0], self.abstract_state["nnx"][1]
        shardings = self.state_shardings["nnx"]

        def per_device(abstract, sharding) -> int:
            shard = sharding.shard_shape(abstract.shape)
            return math.prod(shard) * np.dtype(abstract.dtype).itemsize

        rows = []
        for (path, var), (_, sh) in zip(_nnx.to_flat_state(model_state),
                                        _nnx.to_flat_state(shardings[0])):
            a, spec = var.get_value(), sh.get_value()
            rows.append(("/".join(map(str, path)), str(tuple(a.shape)), str(a.dtype),
                         str(spec.spec), f"{per_device(a, spec):,}"))
        head = ("parameter", "shape", "dtype", "PartitionSpec", "bytes/device")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines += [fmt.format(*head)] + [fmt.format(*r) for r in rows]

        def total(tree, shard_tree) -> int:
            leaves = jax.tree.leaves(tree)
            return sum(per_device(a, s) for a, s in zip(leaves, jax.tree.leaves(shard_tree)))

        p_bytes = total(model_state, shardings[0])
        o_bytes = total(opt_state, shardings[1])
        lines.append(f"per device: parameters {_mib(p_bytes)} + optimizer state {_mib(o_bytes)} "
                     f"= {_mib(p_bytes + o_bytes)} ({self.num_params():,} parameters)")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.problems:
            lines.append("problems for this mesh:")
            lines += ["  " + line for p in self.problems for line in p.splitlines()]
            lines.append("the step was not compiled; fix the problems above")
            return "\n".join(lines)
        local = next(iter(process_batches(self.task.train_data(),
                                          self.config.train.global_batch_size, prefetch=0)))
        local = {k: v.reshape((self.accum, v.shape[0] // self.accum) + v.shape[1:])
                 for k, v in local.items()}
        shard = self._batch_shardings(local, leading=1)
        batch = {k: jax.ShapeDtypeStruct(
            (self.accum, v.shape[1] * jax.process_count()) + v.shape[2:], v.dtype,
            sharding=shard[k]) for k, v in local.items()}
        compiled = self._compile_train_step(batch)
        lines += self._plan_report(compiled)
        return "\n".join(lines)

    def _plan_report(self, compiled) -> list[str]:
        """The compiled step's per-chip memory against the chip's, its FLOPs, and (where the
        compiler estimates it: TPU) its step time with the implied throughput and MFU. Kept in
        self.plan (a dict) for tools such as bench/pod_plan.py."""
        device = self.mesh.devices.flat[0]
        cfg = self.config.train
        plan = {"chips": self.mesh.size, "device_kind": device.device_kind,
                "params": self.num_params(), "step_flops": self.step_flops}
        lines = []
        mem = compiled.memory_analysis()
        if mem is not None:
            # live at once: inputs, outputs not written in place of a donated input, temporaries
            need = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
            have, source = perf.device_memory(device)
            plan.update(bytes_per_chip=need, chip_bytes=have, fits=bool(need <= have))
            lines.append(
                "compiled train step, per device: arguments "
                f"{_mib(mem.argument_size_in_bytes)}, outputs {_mib(mem.output_size_in_bytes)}, "
                f"temporaries {_mib(mem.temp_size_in_bytes)}, aliased (donated) "
                f"{_mib(mem.alias_size_in_bytes)}, code {_mib(mem.generated_code_size_in_bytes)}")
            verdict = ("fits" if need <= have else "DOES NOT FIT") if have == have else "unknown"
            lines.append(f"memory per device: {_gib(need)} of {_gib(have)} ({source}): {verdict}")
        lines.append(f"compiled train step: {self.step_flops / 1e9:,.2f} GFLOP per step "
                     f"(all devices), batch {cfg.global_batch_size} "
                     f"x {self.accum} accumulation micro-step(s); no problems for this mesh")
        seconds, how = perf.estimated_seconds(compiled, device)
        if seconds > 0:  # not nan
            units = cfg.global_batch_size * self.task.units_per_example()
            peak, source = perf.peak_flops(list(self.mesh.devices.flat))
            plan.update(step_seconds=seconds, units_per_second=units / seconds,
                        mfu=self.step_flops / seconds / peak, estimate=how)
            lines.append(
                f"estimated step time ({how}; no communication overlap: a lower bound): "
                f"{_seconds(seconds)} -> {units / seconds:,.0f} {self.task.throughput_unit}/s, "
                f"MFU {self.step_flops / seconds / peak:.1%} of the {source} x {self.mesh.size}")
        self.plan = plan
        return lines

    def _check_eval_size(self) -> None:
        """Fails now, not after training, when the eval split cannot fill one micro-batch."""
        try:
            n = len(self.task.eval_data())
        except ConfigError as e:
            raise ConfigError(f"the eval split: {e}") from None
        except TypeError:  # a dataset of unknown length: nothing to check up front
            return
        if n < self.micro_batch:
            raise ConfigError(
                f"config.data: the eval split holds {n} examples, fewer than one eval micro-batch "
                f"of {self.micro_batch} (train.global_batch_size / train.grad_accum_steps); use "
                "more data or a smaller batch")

    # ------------------------------------------------------------------ state
    def _build(self):
        model = self.task.build_model(nnx.Rngs(self.config.seed))
        return model, nnx.Optimizer(model, self.tx, wrt=self.trainable)

    @property
    def trainable(self):
        """The NNX filter of trained parameters: all Params, or those whose path matches
        train.trainable."""
        pattern = self.config.train.trainable
        if not pattern:
            return nnx.Param
        regex = re.compile(pattern)
        return nnx.All(nnx.Param, lambda path, _: bool(regex.search("/".join(map(str, path)))))

    def _fresh_state(self):
        def init():
            return {"nnx": nnx.state(self._build()), "step": jnp.zeros((), jnp.int32),
                    "nonfinite": jnp.zeros((), jnp.int32),
                    "first_nonfinite": jnp.full((), -1, jnp.int32)}
        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_shardings)()

    def _log(self, msg: str) -> None:
        if not self.quiet and jax.process_index() == 0:
            print(msg, flush=True)

    def initial_state(self):
        """Restores the newest checkpoint in the workdir (with the data position), else initialises."""
        if self.state is not None:
            return self.state
        self.train_iter = iter(process_batches(self.task.train_data(), self.config.train.global_batch_size))
        self.state = self._restore_newest()
        if self.state is None:
            self.state = self._fresh_state()
            if self.config.init_from:
                self.state = self._init_from(self.config.init_from, self.state)
        return self.state

    def _restore_newest(self):
        """The newest readable checkpoint of the workdir, resharded onto this mesh (None if there
        is none). Interrupted saves and unreadable steps are skipped with a warning naming them;
        unreadable steps are moved to workdir/checkpoints.unreadable/, never deleted. A checkpoint
        of a different model is an error: resuming it silently would lose the run."""
        for d in self.checkpoints.incomplete():
            self._warn(f"skipping {d}: an incomplete checkpoint (its save was interrupted)")
        for step in reversed(self.checkpoints.all_steps()):
            try:
                problems = self.checkpoints.mismatches(step, self.abstract_state)
                if problems:
                    raise ConfigError(
                        f"the workdir {self.workdir} holds checkpoint {step} of a different model "
                        "(or optimizer):\n  " + "\n  ".join(problems[:20])
                        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
                        + "\nuse a new --workdir, and set init_from=<that workdir> to start a new "
                        "run from its parameters deliberately")
                state = self.checkpoints.restore(step, self.abstract_state, self.state_shardings,
                                                 self.train_iter)
            except UnreadableCheckpoint as e:
                moved = self.checkpoints.set_aside(step)
                self._warn(f"skipping unreadable checkpoint {e}; moved it to {moved}")
                self.train_iter = iter(process_batches(self.task.train_data(),
                                                       self.config.train.global_batch_size))
                continue
            self._log(f"resuming from {self.checkpoints.step_dir(step)}")
            return state
        return None

    def _warn(self, msg: str) -> None:
        if jax.process_index() == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def _init_from(self, source: str, state):
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
        after (equal when the growth preserves the function), also kept in self.growth.
        """
        src_dir = source if os.path.isdir(os.path.join(source, "checkpoints")) else os.path.dirname(
            os.path.abspath(source).rstrip("/"))
        src = Checkpoints(src_dir, async_save=False)
        try:
            src_step = src.latest_step()
            if src_step is None:
                raise ConfigError(f"config.init_from: no checkpoint in {source!r}")
            src_config = src.restore_config(src_step)
            self.task.check_init_from(src_config)
            carry = self.config.init_from_carry
            with_opt, with_step = "optimizer" in carry, carry.endswith("+step")
            if with_step and src_step >= self.config.train.steps:
                raise ConfigError(
                    f"config.init_from_carry={carry!r} continues at the source's step {src_step}, "
                    f"but train.steps={self.config.train.steps} leaves nothing to train; set "
                    "train.steps to the total over both runs")
            same_data = (src_config.get("data") == json.loads(to_json(self.config))["data"]
                         and src_config.get("train", {}).get("global_batch_size")
                         == self.config.train.global_batch_size)
            flat = src.restore_flat(src_step, self._init_from_sharding(),
                                    self.train_iter if with_step and same_data else None)
        finally:
            src.close()

        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        param_names = {"nnx/0/" + "/".join(map(str, p)) for p, v in
                       nnx.to_flat_state(self.abstract_state["nnx"][0]) if isinstance(v, nnx.Param)}
        # restart: the optimizer's step and the schedule's count start at 0 (fresh values);
        # Adam's own count stays, its bias correction belongs to the carried moments
        fresh = set() if with_step else {"nnx/1/step", *self._schedule_counts()}
        new_ok = re.compile(self.config.init_from_new) if self.config.init_from_new else None
        skip = re.compile(self.config.init_from_skip) if self.config.init_from_skip else None
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
                adapted = self.task.adapt_init_from(short, value, leaf)
                if adapted is None:
                    problems.append(f"{short}: shape {value.shape} in the source, {leaf.shape} here"
                                    f" (the {self.config.task!r} task maps only equal shapes)")
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
            self._log(f"init_from: {len(kept)} new arrays keep their initial values "
                      f"({kept[0]}{', ...' if len(kept) > 1 else ''})")
        if skipped:
            self._log(f"init_from: {len(skipped)} arrays not loaded (config.init_from_skip), "
                      f"initialised afresh ({skipped[0]}{', ...' if len(skipped) > 1 else ''})")
        what = {"params": "parameters", "params+optimizer": "parameters and optimizer state",
                "params+optimizer+step": f"parameters, optimizer state and step {src_step}"}[carry]
        if with_step and not same_data:
            what += " (the data position restarts: the source's data or batch differ)"
        self._log(f"initialised {what} from {src.directory}/{src_step}")
        if grown:
            self.growth = self._growth_report(src_config, flat, new_state, grown)
        return new_state

    def _init_from_sharding(self):
        """sharding_for(name, shape) of a source array: this run's sharding of the array of the
        same name where it divides the source's shape, else replicated (a grown array is
        adapted, then placed)."""
        ours = by_name(self.state_shardings)
        rep = replicated(self.mesh)

        def sharding_for(name, shape):
            s = ours.get(name, rep)
            try:
                s.shard_shape(tuple(shape))
            except ValueError:
                return rep
            return s
        return sharding_for

    def _schedule_counts(self) -> set[str]:
        """Names of the learning-rate schedule's step counters in the optimizer state."""
        params = nnx.state(self._abstract_model, self.trainable)
        raw = jax.eval_shape(self.tx.init, params)
        is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
        return {f"nnx/1/opt_state/{path_name(p)}/count" for p, x in
                jax.tree_util.tree_flatten_with_path(raw, is_leaf=is_sched)[0] if is_sched(x)}

    def _growth_report(self, src_config: dict, flat: dict, new_state, grown: list[str]) -> dict:
        """Parameter counts and the loss on the first eval micro-batch of the source model
        (built from its saved config) and of the grown one, logged in one line."""
        from ml_collections import ConfigDict

        src_task = get_task(src_config["task"])(ConfigDict(src_config))
        gdef, abstract = nnx.split(nnx.eval_shape(lambda: src_task.build_model(nnx.Rngs(0))))
        old_params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(abstract)
                         if isinstance(v, nnx.Param))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        src_state = jax.tree_util.tree_unflatten(treedef, [flat["nnx/0/" + path_name(p)] for p, _ in leaves])
        local = next(iter(process_batches(self.task.eval_data(), self.micro_batch, prefetch=0)))
        batch = global_batch(local, self._batch_shardings(local, leading=0))

        def src_loss(state, batch):
            model = nnx.merge(gdef, state)
            model.eval()
            return loss_with_aux(src_task, model, batch)[0]

        with jax.set_mesh(self.mesh):
            before = float(jax.jit(src_loss)(src_state, batch))
            after = float(jax.jit(self._eval_step_fn)(new_state, batch)[0]["loss"])
        report = {"params_before": old_params, "params_after": self.num_params(),
                  "loss_before": before, "loss_after": after, "grown": grown}
        self._log(f"growth: {len(grown)} arrays grew ({grown[0]}, ...); parameters "
                  f"{old_params:,} -> {self.num_params():,}; loss on a fixed eval batch "
                  f"{before:.6f} before, {after:.6f} after")
        return report

    @property
    def step(self) -> int:
        return int(self.initial_state()["step"])

    @property
    def model(self) -> nnx.Module:
        """A snapshot of the current model: its arrays are copies, so later train steps (which
        donate the train state) neither change nor invalidate it."""
        model, _ = nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.initial_state()["nnx"]))
        return model

    # ------------------------------------------------------------------ steps
    def _loss_and_grads(self, model, batch):
        """Mean loss, metrics and grads over the grad_accum_steps micro-batches of `batch`, and
        the model's non-trainable state after them (what layers updated while running: RNG
        counts, EMA statistics such as Routing's centroids), threaded through the micro-batches."""
        gdef, params, rest = nnx.split(model, self.trainable, ...)

        def f(p, r, mb):
            m = nnx.merge(gdef, p, r, copy=True)  # fresh Variables: layers may update them here
            loss, metrics = loss_with_aux(self.task, m, mb)
            return loss, (metrics, nnx.split(m, self.trainable, ...)[2])

        grad_fn = jax.value_and_grad(f, has_aux=True)
        if self.accum == 1:
            (loss, (metrics, rest)), grads = grad_fn(params, rest, jax.tree.map(lambda x: x[0], batch))
            return loss, metrics, grads, rest

        def body(carry, mb):
            acc, r = carry
            (loss, (metrics, r)), g = grad_fn(params, r, mb)
            return (jax.tree.map(jnp.add, acc, (loss, metrics, g)), r), None

        (loss, (metrics, _)), g = jax.eval_shape(grad_fn, params, rest,
                                                 jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (loss, metrics, g))
        (acc, rest), _ = jax.lax.scan(body, (zeros, rest), batch)
        loss, metrics, grads = jax.tree.map(lambda x: x / self.accum, acc)
        return loss, metrics, grads, rest

    def _train_step_fn(self, state, batch):
        model, optimizer = nnx.merge(self.graphdef, state["nnx"])
        loss, metrics, grads, rest = self._loss_and_grads(model, batch)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(nnx_state):
            m, opt = nnx.merge(self.graphdef, nnx_state)
            nnx.update(m, rest)
            opt.update(m, grads)
            return nnx.state((m, opt))

        # a non-finite loss or gradient never reaches the model: the whole update is skipped
        new_nnx = jax.lax.cond(ok, apply, lambda s: s, nnx.state((model, optimizer)))
        step = state["step"]
        new_state = {
            "nnx": new_nnx,
            "step": step + 1,
            "nonfinite": state["nonfinite"] + (~ok).astype(jnp.int32),
            "first_nonfinite": jnp.where(~ok & (state["first_nonfinite"] < 0), step + 1,
                                         state["first_nonfinite"]),
        }
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
        return new_state, metrics

    def _eval_step_fn(self, state, batch):
        """(batch metrics, the Task's per-example eval_outputs) of one eval micro-batch."""
        model, _ = nnx.merge(self.graphdef, state["nnx"])
        model.eval()  # deterministic layers (dropout off, SSA dense, no EMA updates)
        loss, metrics = loss_with_aux(self.task, model, batch)
        return dict(metrics, loss=loss), self.task.eval_outputs(model, batch)

    def _batch_shardings(self, batch, leading):
        """Per-key shardings: the batch dim (after `leading` unsharded dims) over data x fsdp."""
        key = (leading,) + tuple((k, v.ndim) for k, v in batch.items())
        if key not in self._sharding_cache:  # built once: the step loop calls this every step
            lead = (None,) * leading
            self._sharding_cache[key] = {
                k: NamedSharding(self.mesh, P(*lead, BATCH_AXES, *([None] * (v.ndim - 1 - leading))))
                for k, v in batch.items()}
        return self._sharding_cache[key]

    def _device_batch(self, local):
        """Host-local batch [b, ...] -> global arrays [accum, B/accum, ...] sharded over data x fsdp."""
        local = {k: v.reshape((self.accum, v.shape[0] // self.accum) + v.shape[1:])
                 for k, v in local.items()}
        return global_batch(local, self._batch_shardings(local, leading=1), batch_axis=1)

    def _compile_train_step(self, batch):
        batch_shardings = {k: v.sharding for k, v in batch.items()}
        jitted = jax.jit(self._train_step_fn,
                         in_shardings=(self.state_shardings, batch_shardings),
                         out_shardings=(self.state_shardings, replicated(self.mesh)),
                         donate_argnums=0)
        state = self.state if self.state is not None else self._abstract_sharded_state()
        # kernels are chosen and built for the mesh's chips (TPU devices of a topology when
        # planning a pod run from a CPU machine), not for the host's backend
        chips = self.mesh.devices.flat[0].platform
        with jax.set_mesh(self.mesh), kernel_platform.target_backend(chips):
            compiled = jitted.lower(state, batch).compile()
        self.step_flops = perf.compiled_flops(compiled, self.mesh.size)
        return compiled

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, float]:
        """Eval metrics over (at most) eval.batches global batches, run as micro-batches of
        global_batch_size / grad_accum_steps examples: the batch-averaged loss metrics, then
        the Task's dataset-level ones (eval_metrics of the collected eval_outputs, e.g. COCO
        AP). The Task's eval_images of the same outputs are kept in self.last_eval_images."""
        state = self.initial_state()
        it = process_batches(self.task.eval_data(), self.micro_batch)
        sums, outputs, n = {}, [], 0
        for local in it:
            if n >= max(self.config.eval.batches, 1) * self.accum:
                break
            shardings = self._batch_shardings(local, leading=0)
            batch = global_batch(local, shardings)
            if self._eval_step is None:
                self._eval_step = jax.jit(self._eval_step_fn,
                                          in_shardings=(self.state_shardings, shardings),
                                          out_shardings=replicated(self.mesh))
            with jax.set_mesh(self.mesh):
                m, out = self._eval_step(state, batch)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            if out:
                outputs.append(jax.device_get(out))
            n += 1
        if n == 0:
            raise ConfigError(f"the eval split has fewer than one batch of {self.micro_batch} examples")
        metrics = {k: float(v) / n for k, v in jax.device_get(sums).items()}
        self.last_eval_images = {}
        if outputs:
            collected = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
            metrics.update(self.task.eval_metrics(collected))
            self.last_eval_images = self.task.eval_images(collected)
        self.last_eval = self.task.eval_summary(metrics)
        return self.last_eval

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = self.initial_state()
        self.checkpoints.save(int(state["step"]), state, self.train_iter, to_json(self.config))

    def _check_finite(self, state) -> None:
        if self.config.train.nan_policy == "stop" and int(state["nonfinite"]) > 0:
            first = int(state["first_nonfinite"])
            raise FloatingPointError(
                f"non-finite loss or gradients at step {first} (train.nan_policy='stop'); the "
                f"update of that step was not applied. The last checkpoint is in "
                f"{self.checkpoints.directory}; set train.nan_policy='skip' to skip such steps")

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Trains to train.steps (or to step `max_steps`), checkpointing and evaluating on the way.

        Returns {"step", "loss", "eval": {...}} of the last logged step.
        """
        cfg = self.config
        state = self.initial_state()
        step = int(state["step"])
        until = cfg.train.steps if max_steps is None else min(max_steps, cfg.train.steps)
        units = cfg.train.global_batch_size * self.task.units_per_example()
        unit = self.task.throughput_unit
        peak, _ = perf.peak_flops(list(self.mesh.devices.flat))
        report = Reporter(self.workdir, cfg.train.steps, step,
                          enabled=not self.quiet and jax.process_index() == 0)
        trained = (f" ({self.num_trainable():,} trainable, {self.trainable_share():.2%})"
                   if cfg.train.trainable else "")
        report.print(f"{cfg.task}: step {step} -> {until} on mesh {self.mesh_sizes}, "
                     f"{self.num_params():,} parameters{trained}, workdir {self.workdir}")
        if cfg.train.trainable:
            report.scalars(step, {"params/trainable": self.num_trainable(),
                                  "params/trainable_share": self.trainable_share()})
        last = {"step": step}
        t_mark, step_mark, saved_at, evaluated_at = None, step, -1, -1
        stop = _StopSignals()
        try:
            while step < until:
                batch = self._device_batch(next(self.train_iter))
                if self._train_step is None:
                    self._train_step = self._compile_train_step(batch)
                state, metrics = self._train_step(state, batch)
                self.state = state
                step += 1
                if t_mark is None:  # the first step includes compilation: time from its end
                    jax.block_until_ready(state)
                    t_mark, step_mark = time.perf_counter(), step
                if step % cfg.train.log_every == 0 or step == until:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    self._check_finite(state)
                    now = time.perf_counter()
                    if step > step_mark:
                        dt = (now - t_mark) / (step - step_mark)
                        metrics[f"perf/{unit}/s"] = units / dt
                        metrics["perf/step_s"] = dt
                        metrics["perf/mfu"] = self.step_flops / dt / peak
                    t_mark, step_mark = now, step
                    metrics["lr"] = float(self.schedule(step - 1))
                    metrics["nonfinite_steps"] = float(state["nonfinite"])
                    report.scalars(step, metrics, "train/")
                    report.progress(step, metrics)
                    last.update(step=step, loss=metrics["loss"], metrics=metrics)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < until:
                    ev = self.evaluate()
                    evaluated_at = step
                    report.scalars(step, ev, "eval/")
                    report.images(step, self.last_eval_images, "eval/")
                    report.print(f"eval @ {step}: " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                    t_mark, step_mark = time.perf_counter(), step  # throughput excludes eval
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < until:
                    self._check_finite(state)
                    self.save()
                    saved_at = step
                    t_mark, step_mark = time.perf_counter(), step  # ... and checkpointing
                report.tick(step)
                if stop.requested(step, every=1 if jax.process_count() == 1 else cfg.train.log_every):
                    break
            if stop.signal is not None and step < until:  # preempted: checkpoint and leave
                self._check_finite(state)
                if saved_at != step and self.checkpoints.latest_step() != step:
                    self.save()
                self.checkpoints.wait()
                report.print(f"stopped by {stop.signal} at step {step}; checkpoint "
                             f"{self.checkpoints.step_dir(step)} written, rerun to resume")
                last.update(step=step, preempted=stop.signal)
                return last
            self._check_finite(state)
            if saved_at != step and step > 0 and self.checkpoints.latest_step() != step:
                self.save()
            if evaluated_at != step:
                ev = self.evaluate()
                report.scalars(step, ev, "eval/")
                report.images(step, self.last_eval_images, "eval/")
                report.print(f"eval @ {step}: " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
            last["step"] = step
            last["eval"] = dict(self.last_eval)
            self.checkpoints.wait()
            if step >= cfg.train.steps and not self.quiet and jax.process_index() == 0:
                self.task.on_fit_end(self.model, report.print)
        finally:
            stop.close()
            report.close()
        return last

    def num_params(self) -> int:
        return self._num_params

    def num_trainable(self) -> int:
        """Parameters the optimizer updates (all of them unless train.trainable selects)."""
        return self._num_trainable

    def trainable_share(self) -> float:
        return self._num_trainable / max(self._num_params, 1)

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _StopSignals:
    """SIGTERM / SIGINT during fit: finish the current step, checkpoint, return (preemption).

    A second signal of the same kind acts as if none was caught (SIGINT raises
    KeyboardInterrupt, SIGTERM kills). With several processes the flag is agreed on every
    `every` steps (an all-gather), so all processes stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: str | None = None
        self._caught = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self._caught:  # the second one: behave as without us
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self._caught = True
        self.signal = signal.Signals(signum).name

    def requested(self, step: int, every: int = 1) -> bool:
        if jax.process_count() == 1:
            return self._caught
        if step % max(every, 1):
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self._caught))
        if np.any(flags) and self.signal is None:
            self.signal = "SIGTERM (on another process)"
        return bool(np.any(flags))

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _seconds(t: float) -> str:
    return f"{t:,.2f} s" if t >= 1 else f"{t * 1e3:,.2f} ms" if t >= 1e-3 else f"{t * 1e6:,.1f} us"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"
