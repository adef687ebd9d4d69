"""Planning a pod run from this CPU: the README table of LMs at ~1B and ~8B parameters on TPU
slices, from the trainer's own dry run (`python -m trainer.main --config=... --dry_run
--topology=...`), which compiles the real train step for the slice with libtpu.

    python bench/pod_plan.py                     # the README table (8 compiles, ~15 min)
    python bench/pod_plan.py --configs lm.py:1b --topologies v5p:2x2x1

Each (config, topology) compiles in its own process (a large program's compile takes several
GB of host memory), `--jobs` at a time. Prints a markdown table; never asserts.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = "lm.py:1b,lm.py:gla_1b,lm.py:8b,lm.py:gla_8b"
DEFAULT_TOPOLOGIES = "v5p:4x4x4,v5e:16x16"  # v5p-64 (64 chips), v5e-256 (256 chips)
MARK = "POD_PLAN_JSON "


def plan_one(config: str, topology: str, overrides: list[str]) -> dict:
    """Runs in a child process: the dry run's figures (Trainer.plan) for one config on one slice."""
    import attention  # noqa: F401  (environment before jax starts)
    from trainer.cli import load_config
    from trainer.sharding import topology_devices
    from trainer.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "configs", config), overrides)
    with Trainer(cfg, "/nonexistent/pod_plan", dry_run=True,
                 devices=topology_devices(topology)) as t:
        report = t.dry_run()
    plan = dict(t.plan, problems=t.problems, attention=cfg.model.attention,
                tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len)
    if t.problems:
        plan["report_tail"] = report.splitlines()[-5:]
    return plan


def run_child(config: str, topology: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config, topology, *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}


def row(config: str, topology: str, plan: dict) -> str:
    if "error" in plan:
        return f"| {config} | {topology} | error: {plan['error']} |||||||"
    if plan.get("problems"):
        return f"| {config} | {topology} | sharding problems: {plan['problems'][0][:80]} |||||||"
    gib = plan["bytes_per_chip"] / 2**30
    fits = "yes" if plan["fits"] else "**no**"
    mark = "" if plan.get("estimate") == "XLA's TPU cost model" else " †"
    return (f"| `{config}` | {topology} ({plan['chips']} x {plan['device_kind']}) | "
            f"{plan['params'] / 1e9:.2f}B | {gib:.1f} / {plan['chip_bytes'] / 2**30:.0f} GiB | "
            f"{fits} | {plan['step_flops'] / 1e15:.1f} ({plan['model_flops'] / 1e15:.1f}) | "
            f"{plan['step_seconds']:.2f} s{mark} | "
            f"{plan['units_per_second'] / 1e6:.2f}M | {plan['mfu']:.0%} | {plan['hfu']:.0%} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        config, topology, *overrides = sys.argv[2:]
        print(MARK + json.dumps(plan_one(config, topology, overrides)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated, under configs/")
    ap.add_argument("--topologies", default=DEFAULT_TOPOLOGIES, help="comma-separated TPU slices")
    ap.add_argument("--jobs", type=int, default=2, help="compiles at a time (each takes GBs)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. "
                                                  "train.global_batch_size=512")
    args = ap.parse_args()
    pairs = [(c, t) for c in args.configs.split(",") for t in args.topologies.split(",")]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        plans = list(pool.map(lambda p: run_child(*p, args.overrides), pairs))
    print("| config | slice | parameters | memory per chip | fits | PFLOP / step: compiled (model) "
          "| est. step time | tokens/s | est. MFU | est. HFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (config, topology), plan in zip(pairs, plans):
        print(row(config, topology, plan))
    print("\nstep time: XLA's TPU cost model, a lower bound (no communication overlap)")
    for p in plans:
        if p.get("estimate", "XLA's TPU cost model") != "XLA's TPU cost model":
            print(f"† {p['estimate']}: compute-bound rows read 100% MFU by construction")
            break
    for (config, topology), plan in zip(pairs, plans):  # the raw figures, for other tables
        print(MARK + json.dumps(dict(plan, config=config, topology=topology)))


if __name__ == "__main__":
    main()
