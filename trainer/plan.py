"""The dry run (`python -m trainer.main --dry_run [--topology=v5p:4x4x4]`): what a run would
take, without training or allocating its state. `report(trainer)` is `Trainer.dry_run()`:
parameters with their shapes, PartitionSpecs and bytes per device, the per-device totals, the
mesh problems, and the compiled train step's memory, FLOPs and (where the compiler estimates
it) step time and MFU, kept in `trainer.plan` for tools such as bench/pod_plan.py. `trainer`
is a Trainer built with dry_run=True (its abstract state, shardings and mesh).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from trainer import perf
from trainer.data import process_batches


def report(trainer) -> str:
    """A report, without training or allocating the state: every parameter's shape,
    PartitionSpec and bytes per device; per-device bytes of parameters and optimizer state;
    the divisibility problems; and, when there are none, the compiled train step's memory
    analysis and FLOPs."""
    lines = [f"dry run: task {trainer.config.task}, mesh {trainer.mesh_sizes} over "
             f"{trainer.mesh.size} {trainer.mesh.devices.flat[0].platform} devices"]
    model_state, opt_state = trainer.abstract_state.nnx[0], trainer.abstract_state.nnx[1]
    shardings = trainer.state_shardings.nnx

    def per_device(abstract, sharding) -> int:
        shard = sharding.shard_shape(abstract.shape)
        return math.prod(shard) * np.dtype(abstract.dtype).itemsize

    rows = []
    for (path, var), (_, sh) in zip(nnx.to_flat_state(model_state),
                                    nnx.to_flat_state(shardings[0])):
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
                 f"= {_mib(p_bytes + o_bytes)} ({trainer.num_params():,} parameters)")
    lines += [f"warning: {w}" for w in trainer.warnings]
    if trainer.problems:
        lines.append("problems for this mesh:")
        lines += ["  " + line for p in trainer.problems for line in p.splitlines()]
        lines.append("the step was not compiled; fix the problems above")
        return "\n".join(lines)
    local = next(iter(process_batches(trainer.task.train_data(),
                                      trainer.config.train.global_batch_size, prefetch=0)))
    local = {k: v.reshape((trainer.accum, v.shape[0] // trainer.accum) + v.shape[1:])
             for k, v in local.items()}
    shard = trainer._batch_shardings(local, leading=1)
    batch = {k: jax.ShapeDtypeStruct(
        (trainer.accum, v.shape[1] * jax.process_count()) + v.shape[2:], v.dtype,
        sharding=shard[k]) for k, v in local.items()}
    compiled = trainer._compile_train_step(batch)
    lines += _compiled_report(trainer, compiled)
    return "\n".join(lines)

def _compiled_report(trainer, compiled) -> list[str]:
    """The compiled step's per-chip memory against the chip's, its FLOPs, and (where the
    compiler estimates it: TPU) its step time with the implied throughput and MFU. Kept in
    trainer.plan (a dict) for tools such as bench/pod_plan.py."""
    device = trainer.mesh.devices.flat[0]
    cfg = trainer.config.train
    plan = {"chips": trainer.mesh.size, "device_kind": device.device_kind,
            "params": trainer.num_params(), "step_flops": trainer.step_flops,
            "model_flops": trainer.model_flops}
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
    lines.append(f"compiled train step: {trainer.step_flops / 1e9:,.2f} GFLOP per step "
                 f"(all devices, rematerialisation included; the model's: "
                 f"{trainer.model_flops / 1e9:,.2f} GFLOP), batch {cfg.global_batch_size} "
                 f"x {trainer.accum} accumulation micro-step(s); no problems for this mesh")
    seconds, how = perf.estimated_seconds(compiled, device)
    if seconds > 0:  # not nan
        units = cfg.global_batch_size * trainer.task.units_per_example()
        peak, source = perf.peak_flops(list(trainer.mesh.devices.flat))
        mfu, hfu = trainer.model_flops / seconds / peak, trainer.step_flops / seconds / peak
        plan.update(step_seconds=seconds, units_per_second=units / seconds, mfu=mfu, hfu=hfu,
                    estimate=how)
        lines.append(
            f"estimated step time ({how}; no communication overlap: a lower bound): "
            f"{_seconds(seconds)} -> {units / seconds:,.0f} {trainer.task.throughput_unit}/s, "
            f"MFU {mfu:.1%} (model FLOPs), HFU {hfu:.1%} (compiled FLOPs) of the {source} "
            f"x {trainer.mesh.size}")
    trainer.plan = plan
    return lines



def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _seconds(t: float) -> str:
    return f"{t:,.2f} s" if t >= 1 else f"{t * 1e3:,.2f} ms" if t >= 1e-3 else f"{t * 1e6:,.1f} us"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"
