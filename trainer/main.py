"""Command line: python -m trainer.main --config=configs/lm.py:tiny --workdir=DIR [--config.a.b=v ...]

A config with `stages` (e.g. configs/tokenformer.py:grow) trains its stages in order, each in
<workdir>/stage_<i> and initialised from the previous one (trainer/stages.py).

Planning without training: --dry_run (this machine's devices) or --dry_run --topology=v5p:4x4x4
(a TPU slice, compiled here with libtpu).

Every config field can be overridden with --config.<field>=<value>; configs are locked, so a
misspelt field fails with the list of valid ones. A rerun with the same workdir resumes.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.cli import load_config, parse_with_overrides
from trainer.config import ConfigError
from trainer.signals import StopSignals


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m trainer.main",
        description="Train a polyformer model. Any config field: --config.<group>.<field>=<value>.")
    p.add_argument("--config", required=True, help="config file and variant, e.g. configs/lm.py:tiny")
    p.add_argument("--workdir", default=None,
                   help="checkpoints + TensorBoard logs; default runs/<config>_<variant>; "
                        "an existing workdir resumes")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop (with a checkpoint) at this step; a later run continues")
    p.add_argument("--dry_run", action="store_true",
                   help="print parameter shapes, shardings, per-device memory and the compiled "
                        "step's memory and FLOPs, then exit without training")
    p.add_argument("--topology", default=None,
                   help="with --dry_run: plan for a TPU slice instead of this machine's devices, "
                        "e.g. v5p:4x4x4 or v5e:16x16 (compiled here with libtpu: per-chip memory, "
                        "FLOPs, estimated step time and MFU)")
    g = p.add_argument_group(
        "multiple processes (jax.distributed); see README 'Running on a pod / cluster'")
    g.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="this process's index (env JAX_PROCESS_ID)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, "
                        "SLURM, Open MPI, Kubernetes) when no coordinator is given")
    args, overrides = parse_with_overrides(p, argv)
    if args.topology and not args.dry_run:
        p.error("--topology plans a run on other hardware and needs --dry_run")
    return args, overrides


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def init_distributed(args) -> None:
    """Joins the multi-process runtime before anything touches a device."""
    given = [a for a in ("coordinator_address", "num_processes", "process_id")
             if getattr(args, a) is not None]
    if not given and not args.distributed:
        return
    import jax
    # CPU processes exchange collectives over gloo (TPU/GPU use their own interconnect)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if given and len(given) < 3 and not args.distributed:
        missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(given))
        raise SystemExit(f"error: multi-process runs need --coordinator_address, --num_processes "
                         f"and --process_id together (missing: {', '.join('--' + m for m in missing)})")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    init_distributed(args)
    if args.dry_run:
        return _main(args, overrides, None)
    # SIGTERM / SIGINT from here on are held until the loop can stop with a checkpoint (or
    # end the run before its first step): a preemption during start-up, restore or compile
    # exits 0 like one during training. Made after jax.distributed.initialize, which installs
    # its own SIGTERM handler (XLA's preemption notifier) over any made before it.
    with StopSignals() as stop:
        return _main(args, overrides, stop)


def _main(args, overrides, stop) -> int:
    # imported after argument parsing (jax, orbax): --help stays fast and bad flags fail
    # before jax starts
    from trainer.checkpoint import CheckpointError
    from trainer.stages import fit_stages, runs
    from trainer.trainer import Trainer

    try:
        # the one pipeline (trainer/cli.py): load -> mechanism options -> overrides -> check
        # every run (every stage of config.stages) -> a Trainer per run
        config = load_config(args.config, overrides)
        path, _, variant = args.config.partition(":")
        workdir = args.workdir or os.path.join(
            "runs", os.path.splitext(os.path.basename(path))[0] + (f"_{variant}" if variant else ""))
        planned = runs(config, workdir)
        devices = None
        if args.topology:
            from trainer.sharding import topology_devices
            devices = topology_devices(args.topology)
        if args.dry_run:
            bad = 0
            for i, (c, d) in enumerate(planned, 1):
                if len(planned) > 1:
                    print(f"stage {i}:")
                with Trainer(c, d, dry_run=True, devices=devices, checked=True) as t:
                    print(t.dry_run())
                    bad += bool(t.problems)
            return 1 if bad else 0
        if config.stages:  # a schedule of runs (trainer/stages.py)
            result = fit_stages(config, workdir, devices=devices, max_steps=args.max_steps,
                                planned=planned, stop=stop)[-1]
            where = os.path.join(result["workdir"], "checkpoints")
        else:
            (c, d), = planned
            with Trainer(c, d, devices=devices, checked=True) as trainer:
                result = trainer.fit(max_steps=args.max_steps, stop=stop)
                where = trainer.checkpoints.directory
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # storage, or no readable checkpoint: nothing was moved
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.get("preempted"):
        return 0  # the Trainer printed where it stopped and what it saved
    ev = result.get("eval", {})
    summary = "".join(f" {k}={v:.4g}" for k, v in ev.items())
    saved = os.path.isdir(where) and any(name.isdigit() for name in os.listdir(where))
    print(f"done: step {result['step']}{summary}; " + (
        f"checkpoints in {where}" if saved else "nothing was trained, no checkpoint written"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
