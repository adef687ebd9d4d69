"""Does checkpointing stall the step loop? Step time with no saves, with asynchronous saves and
with synchronous saves every few steps, side by side (alternating repetitions) in one run.

The loop is the Trainer's own step loop (input pipeline, donated step) with `Trainer.save()`
every `--every` steps; the time runs from the end of the compiling first step until the last
step's result is ready, and the wait for the last background write is reported separately.
Prints, never asserts.

    python bench/checkpoint.py [--variant default] [--steps 15] [--every 5] [--reps 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from trainer import Trainer, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("no saves", "async saves", "sync saves")


def loop(variant: str, mode: str, steps: int, every: int) -> tuple[float, float, float, float]:
    """(seconds per step of the loop, seconds waiting for the last write, MB per checkpoint,
    seconds the loop spent inside save() per save)."""
    config = load_config(os.path.join(ROOT, f"configs/lm.py:{variant}"), [
        f"train.steps={steps + 1}", "eval.every=0", "checkpoint.every=0",
        f"checkpoint.async_save={'false' if mode == 'sync saves' else 'true'}",
        "checkpoint.max_to_keep=2"])
    with tempfile.TemporaryDirectory() as d, Trainer(config, d, quiet=True) as t:
        state = t.initial_state()
        batch = t._device_batch(next(t.train_iter))
        t._train_step = t._compile_train_step(batch)
        state, _ = t._train_step(state, batch)
        t.state = jax.block_until_ready(state)
        t0, in_save, saves = time.perf_counter(), 0.0, 0
        for i in range(1, steps + 1):
            batch = t._device_batch(next(t.train_iter))
            state, metrics = t._train_step(state, batch)
            t.state = state
            if i % every == 0:  # the same sync point in every mode: save() blocks on the state
                jax.block_until_ready(state)
            if mode != "no saves" and i % every == 0:
                ts = time.perf_counter()
                t.save()
                in_save, saves = in_save + time.perf_counter() - ts, saves + 1
        jax.block_until_ready((state, metrics))
        loop_s = (time.perf_counter() - t0) / steps
        t1 = time.perf_counter()
        t.checkpoints.wait()
        wait_s = time.perf_counter() - t1
        size = 0
        for root, _, files in os.walk(t.checkpoints.directory):
            size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        n = max(len(t.checkpoints.all_steps()), 1)
        return loop_s, wait_s, size / n / 1e6, in_save / max(saves, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="default")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; "
          f"lm:{a.variant}, {a.steps} steps, a save every {a.every}")
    results = {m: [] for m in MODES}
    for _ in range(a.reps):
        for m in MODES:
            results[m].append(loop(a.variant, m, a.steps, a.every))
    base = [r[0] for r in results["no saves"]]
    print("\n| mode | s/step (median) | / no saves (median of per-rep ratios) | s in save() per save "
          "| final wait s | MB/checkpoint |")
    print("|---|---|---|---|---|---|")
    for m in MODES:
        per_step = [r[0] for r in results[m]]
        ratios = [x / b for x, b in zip(per_step, base)]
        size = results[m][0][2] if m != "no saves" else float("nan")
        print(f"| {m} | {statistics.median(per_step):.3f} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) | "
              f"{statistics.median(r[3] for r in results[m]):.3f} | "
              f"{statistics.median(r[1] for r in results[m]):.2f} | {size:.1f} |")
    print("\nratio = step time with saves / without; 1.0 = saving costs the loop nothing. "
          "'s in save()' is the\nstall proper; the rest of an async save's cost is its background "
          "write sharing the CPU cores.")


if __name__ == "__main__":
    main()
