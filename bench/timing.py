"""Shared timing helper of the bench scripts."""
from __future__ import annotations

import statistics
import time

import jax


def time_one(f, args, reps: int) -> float:
    """Median wall time (s) of jax.block_until_ready(f(*args)) over `reps` calls, after one call
    that compiles and warms up."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
