"""Preemption: SIGTERM / SIGINT finish the current step, checkpoint and exit 0.

`StopSignals` catches the two signals from the moment it is made: `python -m trainer.main`
makes one as soon as the (multi-process) runtime is up, so a signal during start-up,
restoring, compiling, an evaluation or a save is held until the loop can act on it
(Trainer.fit checks before every step and stops with a checkpoint of the last finished one;
before the first step there is nothing new to save). Light: jax is imported only for the
multi-process agreement.
"""
from __future__ import annotations

import signal
import threading

import numpy as np


class StopSignals:
    """Records the first SIGTERM / SIGINT; a second signal of the same kind acts as if none was
    caught (SIGINT raises KeyboardInterrupt, SIGTERM kills). With several processes the flag is
    agreed on every `every` steps (an all-gather), so all processes stop at the same step.
    Use as a context manager, or close() to restore the previous handlers."""

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
        import jax
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

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
