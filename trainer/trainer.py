"""The generic, sharded training loop. Knows nothing about any family: the Task does.

    trainer = Trainer(config, workdir)
    trainer.fit()                 # train to config.train.steps, resuming from workdir if possible
    trainer.fit(max_steps=50)     # ... or stop (and checkpoint) at step 50; a later fit() goes on
    trainer.evaluate()            # eval metrics of the current state
    trainer.model                 # the NNX model (for notebooks: sampling, attention maps)

The train state is one typed pytree (trainer/state.py TrainState: nnx = the nnx.State of (model,
optimizer), step, nonfinite, first_nonfinite), sharded by the logical-axis rules, donated to the jitted step and pinned to
the same shardings on the way out so the step compiles exactly once.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import platform as kernel_platform
from trainer import perf, plan, transfer
from trainer.checkpoint import (CheckpointError, Checkpoints, UnreadableCheckpoint, by_name,
                                first_line, path_name)
from trainer.cli import check
from trainer.config import ConfigError, resume_changes, to_json
from trainer.data import BadExample, SkipBad, global_batch, process_batches
from trainer.logs import Reporter
from trainer.optim import lr_schedule, make_optimizer
from trainer.sharding import BATCH_AXES, make_mesh, mesh_shape, replicated, state_shardings
from trainer.signals import StopSignals
from trainer.state import TrainState
from trainer.task import get_task, loss_with_aux


class Trainer:
    def __init__(self, config, workdir: str, *, devices=None, quiet: bool = False,
                 dry_run: bool = False, checked: bool = False, match_data: bool = True):
        """dry_run: collect divisibility problems in self.problems instead of raising, and
        touch nothing on disk (see `dry_run()`). checked: the config already passed
        trainer.cli.check (trainer.cli.runs does it for every run of a command). match_data
        False: the model need not fit the config's data (Task.match_data; trainer.convert
        writes a checkpoint of a model trained elsewhere, e.g. on other labels)."""
        if not checked:
            check(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.quiet = quiet
        self.task = get_task(config.task)(config)
        self.task.match_data = match_data
        self.problems: list[str] = []

        def problem(error: ConfigError) -> None:
            if not dry_run:
                raise error
            self.problems.append(str(error))

        devices = list(devices) if devices is not None else jax.devices()
        self.mesh_sizes = mesh_shape(config, len(devices))
        # a value that is wrong on any mesh is an error even in a dry run (which lists only
        # what this mesh cannot divide): there the Task's checks run on one device first (a
        # normal run raises from the check below; validate may scan data folders, so once)
        if dry_run:  # Task.check: check_fields (bounds), then validate
            self.task.check({axis: 1 for axis in self.mesh_sizes})
        else:
            self.task.check_fields()
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
        try:  # outside the mesh: names are logical here
            abstract = nnx.eval_shape(self._build)
        except (ArithmeticError, LookupError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            # a value the family's checks let through: no traceback, the error's first line
            raise ConfigError(f"config.model: the {config.task!r} model cannot be built from "
                              f"this config: {first_line(e)}") from e
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
        self.state_shardings = TrainState.like(nnx_shardings, rep)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract_state = TrainState.like(abstract_nnx, scalar)
        self.checkpoints = None if dry_run else Checkpoints(
            self.workdir, max_to_keep=config.checkpoint.max_to_keep,
            async_save=config.checkpoint.async_save, retries=config.checkpoint.restore_retries,
            retry_seconds=config.checkpoint.retry_seconds)
        self.state = None
        self.train_iter = None
        self._train_step = None  # AOT-compiled on the first batch
        self._eval_step = None
        self.step_flops = float("nan")  # the compiled step's (rematerialisation included)
        self.model_flops = float("nan")  # the model's: 3x its forward's matrix products
        self.plan: dict = {}  # dry_run()'s figures
        self.growth: dict = {}  # _init_from's report when it grew arrays
        self.last_eval: dict[str, float] = {}
        self.last_eval_images: dict[str, np.ndarray] = {}
        self.last_train: dict = {}
        # fit()'s hooks, run in this order: logging, checkpoints, evaluation, then the user's
        self.hooks: list[Hook] = self._default_hooks()
        self._sharding_cache: dict = {}

    def _abstract_sharded_state(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def dry_run(self) -> str:
        """A report, without training or allocating the state (trainer/plan.py): every
        parameter's shape, PartitionSpec and bytes per device; per-device bytes of parameters
        and optimizer state; the divisibility problems; and, when there are none, the compiled
        train step's memory analysis and FLOPs (kept in self.plan)."""
        return plan.report(self)

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
            return TrainState.fresh(nnx.state(self._build()))
        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_shardings)()

    def _log(self, msg: str) -> None:
        if not self.quiet and jax.process_index() == 0:
            print(msg, flush=True)

    def initial_state(self):
        """Restores the newest checkpoint in the workdir (with the data position), else initialises."""
        if self.state is not None:
            return self.state
        self._read_from(0)
        self.state = self._restore_newest()
        if self.state is None:
            self.state = self._fresh_state()
            if self.config.init_from:
                self.state = transfer.init_from(self, self.config.init_from, self.state)
        return self.state

    def _restore_newest(self):
        """The newest readable checkpoint of the workdir, resharded onto this mesh (None if there
        is none). Interrupted saves are skipped with a warning naming them. A read that fails is
        retried (config.checkpoint.restore_retries); a step whose files then fail verification is
        skipped for an older one, and moved to workdir/checkpoints.unreadable/ (never deleted)
        only once an older step has been read. A storage error that persists stops the run with
        nothing moved (CheckpointError), as does a workdir none of whose checkpoints is readable
        unless config.checkpoint.from_scratch. A checkpoint of a different model, or saved with
        a config whose model, data or schedule differ (trainer.config.resume_changes), is a
        ConfigError: resuming it silently would lose the run."""
        for d in self.checkpoints.incomplete():
            self._warn(f"skipping {d}: an incomplete checkpoint (its save was interrupted)")
        unreadable = []  # steps newer than the one resumed whose files failed verification
        steps = self.checkpoints.all_steps()
        for step in reversed(steps):
            try:
                self._check_resumable(step)
                if self.checkpoints.params_only(step):  # an import: a fresh optimizer, step 0
                    state, position = self._fresh_with_params(step), None
                else:
                    state, position = self.checkpoints.restore(
                        step, self.abstract_state.as_dict(), self.state_shardings.as_dict())
                    state = TrainState.from_dict(state)
            except UnreadableCheckpoint as e:
                self._warn(f"skipping unreadable checkpoint {e}")
                unreadable.append(step)
                continue
            if position is not None:
                self.data_position = position
            for line in self.checkpoints.retried:
                self._warn(f"read on a later try: {line}")
            self._set_aside(unreadable)
            self._log(f"resuming from {self.checkpoints.step_dir(step)}")
            return state
        if unreadable and not self.config.checkpoint.from_scratch:
            raise CheckpointError(
                f"the workdir {self.workdir} holds checkpoints {', '.join(map(str, steps))} and "
                "none of them is readable (see the warnings above); nothing was moved. To start "
                "this workdir again from step 0, set --config.checkpoint.from_scratch=True (the "
                "unreadable steps are then moved to checkpoints.unreadable/), or use a new "
                "--workdir")
        self._set_aside(unreadable)
        return None

    def _read_from(self, first_example: int) -> None:
        """A fresh train iterator whose first global batch starts at example `first_example`."""
        self._close_input()
        self._first_example, self._batches_read = first_example, 0
        self._train_source = SkipBad(self.task.train_data(), self.config.data.skip_bad)
        self.train_iter = iter(process_batches(self._train_source,
                                               self.config.train.global_batch_size,
                                               first_example=first_example,
                                               num_workers=self.config.data.num_workers))

    def _next_batch(self) -> dict:
        batch = next(self.train_iter)
        self._batches_read += 1
        return batch

    @property
    def data_position(self) -> dict:
        """Where the input stands: the examples consumed (global batch b is examples
        [first + b G, first + (b + 1) G) of the Task's dataset, whatever the processes and
        workers), the global batch size, and the iterator's state (for reference)."""
        g = self.config.train.global_batch_size
        return {"iterator": self.train_iter.get_state(), "global_batch_size": g,
                "examples": self._first_example + self._batches_read * g}

    @data_position.setter
    def data_position(self, position: dict) -> None:
        """Continues the input at the saved example (any global batch size, any number of
        workers: the datasets are random-access, augmentations drawn per index); a checkpoint
        that predates "examples" goes on from its iterator's batch count."""
        if "examples" in position:
            self._read_from(position["examples"])
        else:
            self._read_from(position["iterator"]["next_index"] * position.get(
                "global_batch_size", self.config.train.global_batch_size))

    def _fresh_with_params(self, step: int):
        """A fresh train state whose model arrays are those of params-only checkpoint `step`
        (trainer.checkpoint.write_params_checkpoint), each read into this mesh's layout."""
        state = self._fresh_state()
        shardings = by_name(self.state_shardings.as_dict())
        flat = self.checkpoints.restore_flat(step, lambda name, shape: shardings[name])
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state.as_dict())
        out = [flat[n].astype(leaf.dtype) if (n := path_name(p)) in flat else leaf
               for p, leaf in leaves]
        return TrainState.from_dict(jax.tree_util.tree_unflatten(treedef, out))

    def _check_resumable(self, step: int) -> None:
        """Raises ConfigError when checkpoint `step` is of another model or was saved with a
        config whose model, data stream or schedule differ from this one's."""
        changes = resume_changes(self.checkpoints.restore_config(step), self.config,
                                 self.task.resume_free, training=self.config.train.steps > step)
        if self.checkpoints.params_only(step):  # an import: only the model must be the same
            changes = [c for c in changes if c.startswith(("task", "model."))]
        if changes:
            fields = ",".join(dict.fromkeys(c.split(":")[0] for c in changes))
            raise ConfigError(
                f"the workdir {self.workdir} holds checkpoint {step} of a run with another "
                f"model, data stream or schedule; resuming would silently change:\n  "
                + "\n  ".join(changes)
                + f"\nrerun with the checkpoint's values, use a new --workdir, or allow the "
                f"change on purpose: --config.checkpoint.allow_changes={fields}")
        problems = self.checkpoints.mismatches(step, self.abstract_state.as_dict())
        if problems:
            raise ConfigError(
                f"the workdir {self.workdir} holds checkpoint {step} of a different model "
                "(or optimizer):\n  " + "\n  ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
                + "\nuse a new --workdir, and set init_from=<that workdir> to start a new "
                "run from its parameters deliberately")

    def _set_aside(self, steps) -> None:
        for step in steps:
            moved = self.checkpoints.set_aside(step)
            self._warn(f"moved unreadable checkpoint {step} to {moved}")

    def _warn(self, msg: str) -> None:
        if jax.process_index() == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    @property
    def step(self) -> int:
        return int(self.initial_state().step)

    @property
    def model(self) -> nnx.Module:
        """A snapshot of the current model: its arrays are copies, so later train steps (which
        donate the train state) neither change nor invalidate it."""
        model, _ = nnx.merge(self.graphdef, jax.tree.map(jnp.copy, self.initial_state().nnx))
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
        model, optimizer = nnx.merge(self.graphdef, state.nnx)
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
        step = state.step
        new_state = TrainState(
            nnx=new_nnx,
            step=step + 1,
            nonfinite=state.nonfinite + (~ok).astype(jnp.int32),
            first_nonfinite=jnp.where(~ok & (state.first_nonfinite < 0), step + 1,
                                      state.first_nonfinite),
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
        return new_state, metrics

    def _eval_step_fn(self, state, batch):
        """(batch metrics, the Task's per-example eval_outputs) of one eval micro-batch."""
        model, _ = nnx.merge(self.graphdef, state.nnx)
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
            # model FLOPs (MFU): 3x the forward's matrix products (backward = 2x forward), on the
            # same kernels as the step; the compiled count (HFU) adds rematerialisation
            forward = jax.make_jaxpr(self._forward_loss_fn)(state, batch)
        self.model_flops = 3 * self.accum * perf.matmul_flops(forward)
        self.step_flops = perf.compiled_flops(compiled, self.mesh.size)
        return compiled

    def _forward_loss_fn(self, state, batch):
        """The loss of the first micro-batch: the forward pass model FLOPs are counted on."""
        model, _ = nnx.merge(self.graphdef, state.nnx)
        return loss_with_aux(self.task, model, jax.tree.map(lambda x: x[0], batch))[0]

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, float]:
        """Eval metrics over (at most) eval.batches global batches, run as micro-batches of
        global_batch_size / grad_accum_steps examples: the batch-averaged loss metrics, then
        the Task's dataset-level ones (eval_metrics of the collected eval_outputs, e.g. COCO
        AP). The Task's eval_images of the same outputs are kept in self.last_eval_images."""
        state = self.initial_state()
        it = process_batches(SkipBad(self.task.eval_data(), self.config.data.skip_bad),
                             self.micro_batch)
        sums, outputs, n = {}, [], 0
        for local in it:
            if n >= self.config.eval.batches * self.accum:
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
        self.checkpoints.save(int(state.step), state.as_dict(), self.data_position,
                              to_json(self.config))

    def _check_finite(self, state) -> None:
        if self.config.train.nan_policy == "stop" and int(state.nonfinite) > 0:
            first = int(state.first_nonfinite)
            raise FloatingPointError(
                f"non-finite loss or gradients at step {first} (train.nan_policy='stop'); the "
                f"update of that step was not applied. The last checkpoint is in "
                f"{self.checkpoints.directory}; set train.nan_policy='skip' to skip such steps")

    # ------------------------------------------------------------------ loop
    def add_hook(self, fn: Callable[["Trainer", "StepEvent"], None], *, every: int,
                 at_end: bool = True, name: str | None = None) -> "Hook":
        """Calls fn(trainer, event) after every `every`-th step of fit() (0: never during
        training) and, with at_end, once when fit() finishes unless it just ran at that step.
        event.metrics holds the step's metrics (device arrays; {} at the end), event.report
        the run's Reporter (print, scalars, images). The loop's own evaluation, checkpointing
        and logging are hooks too (self.hooks, in order); a hook's time is left out of the
        throughput figures."""
        hook = Hook(fn=fn, every=int(every), at_end=at_end, name=name or getattr(fn, "__name__", "hook"))
        self.hooks.append(hook)
        return hook

    def _default_hooks(self) -> list["Hook"]:
        cfg = self.config
        return [Hook(self._log_hook, every=cfg.train.log_every, at_end=False, name="log",
                     at_last_step=True),
                Hook(self._checkpoint_hook, every=cfg.checkpoint.every, name="checkpoint"),
                Hook(self._eval_hook, every=cfg.eval.every, name="eval")]

    def _log_hook(self, trainer, event: "StepEvent") -> None:
        """Train metrics to TensorBoard / metrics.jsonl and the progress line, with throughput
        since the last log (hooks' time excluded)."""
        metrics = {k: float(v) for k, v in jax.device_get(event.metrics).items()}
        self._check_finite(self.state)
        clock, step = self._clock, event.step
        now = time.perf_counter()
        if clock["step"] is not None and step > clock["step"]:
            dt = (now - clock["time"]) / (step - clock["step"])
            units = self.config.train.global_batch_size * self.task.units_per_example()
            metrics[f"perf/{self.task.throughput_unit}/s"] = units / dt
            metrics["perf/step_s"] = dt
            metrics["perf/mfu"] = self.model_flops / dt / self._peak
            metrics["perf/hfu"] = self.step_flops / dt / self._peak
        metrics["lr"] = float(self.schedule(step - 1))
        metrics["nonfinite_steps"] = float(self.state.nonfinite)
        event.report.scalars(step, metrics, "train/")
        event.report.progress(step, metrics)
        self.last_train = {"step": step, "loss": metrics["loss"], "metrics": metrics}

    def _checkpoint_hook(self, trainer, event: "StepEvent") -> None:
        self._check_finite(self.state)
        if event.step > 0 and self.checkpoints.latest_step() != event.step:
            self.save()

    def _eval_hook(self, trainer, event: "StepEvent") -> None:
        ev = self.evaluate()
        event.report.scalars(event.step, ev, "eval/")
        event.report.images(event.step, self.last_eval_images, "eval/")
        event.report.print(f"eval @ {event.step}: " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))

    def _run_hook(self, hook: "Hook", event: "StepEvent") -> None:
        hook.fn(self, event)
        hook.last_step = event.step
        # throughput counts training only: the next figure is timed from here
        self._clock.update(time=time.perf_counter(), step=event.step)

    def fit(self, max_steps: int | None = None, *, stop: StopSignals | None = None
            ) -> dict[str, Any]:
        """Trains to train.steps (or to step `max_steps`), running the hooks on the way
        (logging, checkpoints, evaluation: self.hooks; add your own with add_hook). SIGTERM /
        SIGINT stop it before the next step with a checkpoint (trainer.signals; `stop`: one the
        caller made earlier, to hold a signal that came during start-up).

        Returns {"step", "loss", "eval": {...}} of the last logged step.
        """
        cfg = self.config
        state = self.initial_state()
        step = int(state.step)
        until = cfg.train.steps if max_steps is None else min(max_steps, cfg.train.steps)
        self._peak, _ = perf.peak_flops(list(self.mesh.devices.flat))
        report = Reporter(self.workdir, cfg.train.steps, step,
                          enabled=not self.quiet and jax.process_index() == 0)
        trained = (f" ({self.num_trainable():,} trainable, {self.trainable_share():.2%})"
                   if cfg.train.trainable else "")
        report.print(f"{cfg.task}: step {step} -> {until} on mesh {self.mesh_sizes}, "
                     f"{self.num_params():,} parameters{trained}, workdir {self.workdir}")
        if cfg.train.trainable:
            report.scalars(step, {"params/trainable": self.num_trainable(),
                                  "params/trainable_share": self.trainable_share()})
        self.last_train = {"step": step}
        self._clock = {"time": None, "step": step}
        for hook in self.hooks:
            hook.last_step = -1
        own_stop = stop is None  # else the caller's, catching since before start-up
        stop = StopSignals() if own_stop else stop
        within = cfg.checkpoint.stop_within_seconds
        start = step
        try:
            while step < until and not stop.requested(step, within_seconds=within):
                try:
                    local = self._next_batch()
                except BadExample as e:  # data.skip_bad off: keep what was trained, then stop
                    raise self._stopped_by_data(e, state, step, start) from None
                batch = self._device_batch(local)
                if self._train_step is None:
                    self._train_step = self._compile_train_step(batch)
                state, metrics = self._train_step(state, batch)
                self.state = state
                step += 1
                if self._clock["time"] is None:  # the first step includes compilation
                    jax.block_until_ready(state)
                    self._clock.update(time=time.perf_counter(), step=step)
                event = StepEvent(step=step, until=until, metrics=metrics, report=report)
                for hook in self.hooks:
                    if hook.due(step, until):
                        self._run_hook(hook, event)
                report.tick(step)
            if stop.signal is not None and step < until and step == start:
                report.print(f"stopped by {stop.signal} before the first step of this run "
                             f"(at step {step}): nothing new to save, rerun to go on")
                return dict(self.last_train, step=step, preempted=stop.signal)
            if stop.signal is not None and step < until:  # preempted: checkpoint and leave
                self._check_finite(state)
                if self.checkpoints.latest_step() != step:  # (an in-memory lookup)
                    self.save()
                self.checkpoints.wait()
                report.print(f"stopped by {stop.signal} at step {step}; checkpoint "
                             f"{self.checkpoints.step_dir(step)} written, rerun to resume")
                return dict(self.last_train, step=step, preempted=stop.signal)
            self._check_finite(state)
            event = StepEvent(step=step, until=until, metrics={}, report=report, final=True)
            for hook in self.hooks:
                if hook.at_end and hook.last_step != step:
                    self._run_hook(hook, event)
            last = dict(self.last_train, step=step, eval=dict(self.last_eval))
            self.checkpoints.wait()
            if step >= cfg.train.steps and not self.quiet and jax.process_index() == 0:
                self.task.on_fit_end(self.model, report.print)
        finally:
            if own_stop:
                stop.close()
            report.close()
        return last

    def _stopped_by_data(self, error: BadExample, state, step: int, start: int) -> ConfigError:
        """The error that ends a run at a file that cannot be read, after saving the steps
        trained since the last checkpoint (a rerun resumes there once the file is fixed)."""
        saved = ""
        if step > start:
            self._check_finite(state)
            if self.checkpoints.latest_step() != step:
                self.save()
            self.checkpoints.wait()
            saved = f"; checkpoint {self.checkpoints.step_dir(step)} written"
        return ConfigError(f"{error}\nthe run stopped at step {step}{saved}. Replace or remove "
                           "the file and rerun to resume, or set data.skip_bad=True to replace "
                           "each unreadable example by the next readable one")

    def num_params(self) -> int:
        return self._num_params

    def num_trainable(self) -> int:
        """Parameters the optimizer updates (all of them unless train.trainable selects)."""
        return self._num_trainable

    def trainable_share(self) -> float:
        return self._num_trainable / max(self._num_params, 1)

    def close(self) -> None:
        self._close_input()
        if self.checkpoints is not None:
            self.checkpoints.close()

    def _close_input(self) -> None:
        """Stops the train iterator's reader threads / worker processes (data.num_workers)."""
        if getattr(self, "train_iter", None) is not None:
            close = getattr(self.train_iter, "close", None)
            if close is not None:
                close()
            self.train_iter = None
            gc.collect()  # grain's iterators release their shared memory when collected

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@dataclasses.dataclass
class StepEvent:
    """What a hook sees: the step just taken (of `until` in this fit()), its metrics (device
    arrays; {} for the final call), the run's Reporter, and whether fit() is finishing."""
    step: int
    until: int
    metrics: dict
    report: Reporter
    final: bool = False


@dataclasses.dataclass
class Hook:
    """fn(trainer, event) after every `every`-th step (0: never during training; the step that
    ends the fit() only with at_last_step), and at the end of fit() when at_end and it did not
    just run at that step."""
    fn: Callable
    every: int
    at_end: bool = True
    name: str = "hook"
    at_last_step: bool = False
    last_step: int = -1

    def due(self, step: int, until: int) -> bool:
        if step == until and self.at_last_step:
            return True
        return bool(self.every) and step % self.every == 0 and step < until
