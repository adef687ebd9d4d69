"""Shared timing helper of the bench scripts."""
from __future__ import annotations

import statistics
import time

import jax


def time_one(f, args, reps: int, best: bool = False, budget_s: float | None = None) -> float:
    """Median (best=True: minimum) wall time (s) of jax.block_until_ready(f(*args)) over `reps`
    calls, after one call that compiles and warms up. budget_s: fewer reps (at least one) where
    the warm-up call shows that `reps` calls would take longer."""
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    if budget_s is not None:
        reps = max(1, min(reps, int(budget_s / (time.perf_counter() - t0))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def bench_config(config: str, steps: int, overrides=()):
    """The config `path:variant` (relative to the repository root) for a benchmark run: no
    async checkpoint, no periodic eval, `steps` steps with one checkpoint at the end (0: the
    config's own), logging 4 times."""
    import os

    from trainer import load_config

    over = ["checkpoint.async_save=false", "eval.every=0", *overrides]
    if steps:
        over += [f"train.steps={steps}", f"checkpoint.every={steps}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, config), over)
    with c.unlocked():
        c.train.log_every = max(c.train.steps // 4, 1)
    return c
