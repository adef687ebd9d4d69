"""Preemption: SIGTERM / SIGINT finish the current step, checkpoint and exit 0.

`StopSignals` catches the two signals from the moment it is made: `python -m trainer.main`
makes one as soon as the (multi-process) runtime is up, so a signal during start-up,
restoring, compiling, an evaluation or a save is held until the loop can act on it
(Trainer.fit checks before every step and stops with a checkpoint of the last finished one;
before the first step there is nothing new to save). Light: jax is imported only for the
multi-process agreement.
"""
from __future__ import annotations

import math
import signal
import threading
import time

import numpy as np


class StopSignals:
    """Records the first SIGTERM / SIGINT; a second signal of the same kind acts as if none was
    caught (SIGINT raises KeyboardInterrupt, SIGTERM kills). With several processes the flag is
    agreed at sync steps (an all-gather), so all processes stop at the same step, and within
    `within_seconds` of a signal: each sync also gathers every process's seconds per step since
    the last one, and all of them place the next sync floor(within_seconds / the slowest) steps
    on (at least 1), so the gap stays under the bound however slow the steps are.
    Use as a context manager, or close() to restore the previous handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    MAX_INTERVAL = 1000  # steps between syncs, however fast they are

    def __init__(self, *, allgather=None, process_count: int | None = None, clock=time.monotonic):
        """allgather / process_count / clock: stand-ins for tests (default: jax's)."""
        self.signal: str | None = None
        self._caught = False
        self._old = {}
        self._allgather, self._count, self._clock = allgather, process_count, clock
        self._next_sync: int | None = None  # the step of the next agreement
        self._last: tuple[int, float] | None = None  # (step, time) of the last one
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

    def requested(self, step: int, within_seconds: float = 10.0) -> bool:
        """Whether to stop before `step` (all processes get the same answer at the same step).
        One process: a signal was caught. Several: at sync steps (the first call's step, then
        as the class docstring says), an all-gather of the flags and step times."""
        count = self._count
        if count is None:
            import jax
            count = jax.process_count()
        if count == 1:
            return self._caught
        if self._next_sync is not None and self._last[0] <= step < self._next_sync:
            return False  # (a step below the last sync: a new run, e.g. the next stage)
        now = self._clock()
        per_step = 0.0
        if self._last is not None and step > self._last[0]:
            per_step = (now - self._last[1]) / (step - self._last[0])
        gathered = np.asarray(self._gather(np.array([self._caught, per_step], np.float32)))
        gathered = gathered.reshape(-1, 2)
        stop = bool(np.any(gathered[:, 0]))
        if stop and self.signal is None:
            self.signal = "SIGTERM (on another process)"
        slowest = float(np.max(gathered[:, 1]))
        interval = 1 if slowest <= 0 else int(min(max(math.floor(within_seconds / slowest), 1),
                                                  self.MAX_INTERVAL))
        self._next_sync, self._last = step + interval, (step, self._clock())
        return stop

    def _gather(self, x):
        if self._allgather is not None:
            return self._allgather(x)
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(x)

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
