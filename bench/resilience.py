"""Do runs survive? N fault cycles on the tiny LM's command line, each followed by a restart:
kill -9 at a random moment of a run that saves asynchronously every step (so also during
saves), SIGTERM at a random moment, an I/O error injected into the restart's first checkpoint
read (a storage hiccup), and the newest checkpoint truncated before the restart (corruption).

For every cycle it records the newest step logged before the fault, the newest readable
checkpoint, and where the restart resumed ("resuming from .../checkpoints/N"). Prints a table
per fault: cycles, restarts that resumed from the newest readable step, steps lost per cycle
(newest logged step - resumed step; a SIGTERM loses none), and restarts that began again at step
0 while the workdir held a readable checkpoint (must be 0). Prints, never asserts.

    python bench/resilience.py [--cycles 8] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

FAULTS = ("kill -9", "SIGTERM", "I/O error on restore", "corrupt newest checkpoint")
OVERRIDES = ["train.steps=100000", "train.warmup_steps=0", "train.log_every=1", "eval.every=0",
             "checkpoint.every=1", "checkpoint.retry_seconds=0.05", "sample.max_new_tokens=0",
             "model.num_layers=1", "data.seq_len=32"]

# the restart of an "I/O error" cycle: its first Orbax restore raises EIO once (the read is
# retried), then the run goes on as usual
FLAKY_RESTART = """
import sys
import orbax.checkpoint as ocp
restore, failed = ocp.CheckpointManager.restore, []
def flaky(self, *a, **k):
    if not failed:
        failed.append(1)
        raise OSError(5, "Input/output error (injected)")
    return restore(self, *a, **k)
ocp.CheckpointManager.restore = flaky
from trainer.main import main
sys.exit(main(sys.argv[1:]))
"""


def cli(workdir: str, *extra: str, flaky: bool = False) -> list[str]:
    head = [sys.executable, "-c", FLAKY_RESTART] if flaky else [sys.executable, "-m",
                                                                 "trainer.main"]
    return [*head, f"--config={ROOT}/configs/lm.py:tiny", f"--workdir={workdir}",
            *[f"--config.{o}" for o in OVERRIDES], *extra]


def logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by kill -9
                continue
            if "train/loss" in row:
                steps.append(row["step"])
    return steps


def checkpoints(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()
                  and os.path.isfile(os.path.join(d, n, "_CHECKPOINT_METADATA")))


def wait_for_step(proc, workdir: str, step: int, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = logged_steps(workdir)
        if steps and max(steps) >= step:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (rc {proc.returncode}) before step {step}:\n"
                               + proc.stderr.read()[-2000:])
        time.sleep(0.02)
    raise RuntimeError(f"no step {step} within {timeout} s")


def truncate_newest(workdir: str) -> int:
    step = checkpoints(workdir)[-1]
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
        for f in files:
            if "ocdbt" in root or f.startswith("manifest") or root.endswith("/d"):
                open(os.path.join(root, f), "wb").close()
    return step


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    return e


def cycle(workdir: str, fault: str, rng: np.random.Generator) -> dict:
    """Runs to a random step, applies the fault, restarts for two steps; returns the record."""
    before = max(logged_steps(workdir) or [0])
    proc = subprocess.Popen(cli(workdir), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, workdir, before + int(rng.integers(2, 5)))
    if fault in ("kill -9", "SIGTERM"):
        time.sleep(float(rng.uniform(0.0, 0.05)))  # anywhere in a step, a save, a log write
    proc.send_signal(signal.SIGTERM if fault == "SIGTERM" else signal.SIGKILL)
    proc.communicate(timeout=300)
    rec = {"fault": fault, "rc": proc.returncode, "logged": max(logged_steps(workdir))}
    corrupted = truncate_newest(workdir) if fault == "corrupt newest checkpoint" else None
    on_disk = checkpoints(workdir)
    readable = [s for s in on_disk if s != corrupted]
    rec["readable"] = max(readable) if readable else 0
    target = rec["logged"] + 2
    p = subprocess.run(cli(workdir, f"--max_steps={target}", flaky=fault.startswith("I/O")),
                       env=env(), capture_output=True, text=True, timeout=600)
    m = re.search(r"resuming from .*/checkpoints/(\d+)\n", p.stdout)
    rec.update(restart_rc=p.returncode, resumed=int(m[1]) if m else 0,
               error=p.stderr.strip().splitlines()[-1] if p.returncode else "")
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=8, help="fault cycles, the faults in turn")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from trainer.perf import _cpu_name
    rng = np.random.default_rng(args.seed)
    records = []
    with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryDirectory() as cache:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)  # restarts skip recompiling
        t0 = time.time()
        for i in range(args.cycles):
            rec = cycle(workdir, FAULTS[i % len(FAULTS)], rng)
            records.append(rec)
            print(f"cycle {i + 1}: {rec}", file=sys.stderr, flush=True)
        seconds = time.time() - t0
    print(f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.cycles} cycles (seed {args.seed}) in {seconds:.0f} s, the tiny LM on 2 "
          "simulated devices, a checkpoint every step (asynchronous)\n")
    print("| fault | cycles | restarts resuming the newest readable step | steps lost per cycle "
          "(mean / max) | restarted from step 0 | restarts that failed |")
    print("|---|---|---|---|---|---|")
    for fault in FAULTS:
        rs = [r for r in records if r["fault"] == fault]
        if not rs:
            continue
        lost = [r["logged"] - r["resumed"] for r in rs]
        newest = sum(r["resumed"] == r["readable"] for r in rs)
        zero = sum(r["resumed"] == 0 and r["readable"] > 0 for r in rs)
        failed = sum(r["restart_rc"] != 0 for r in rs)
        print(f"| {fault} | {len(rs)} | {newest}/{len(rs)} | {statistics.mean(lost):.1f} / "
              f"{max(lost)} | {zero} | {failed} |")
    print("\nsteps lost = the newest step logged before the fault - the step the restart resumed "
          "from (kill -9 can lose the step whose asynchronous save was cut; corruption loses the "
          "steps since the previous checkpoint; SIGTERM saves the step it stops at)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
