"""SIGTERM at every phase of `python -m trainer.main` (issue 25, item 5): start-up, restoring,
compiling, the first step, an evaluation, an asynchronous save and the final save. Each exits 0
with a resumable workdir, or says that nothing was trained yet. The signal is sent by the
process to itself from inside the phase (deterministic), through main() in this process."""
from __future__ import annotations

import os
import signal

import pytest

import trainer.main as main_module
from conftest import TEST_OVERRIDES, TINY, steps_on_disk
from trainer.checkpoint import Checkpoints
from trainer.trainer import Trainer

STEPS = 3
ARGS = [f"--config={TINY}", *[f"--config.{o}" for o in TEST_OVERRIDES],
        f"--config.train.steps={STEPS}", "--config.checkpoint.every=1"]


def sigterm_during(monkeypatch, owner, name: str, *, call: int = 1, after: bool = False):
    """owner.name sends SIGTERM to this process on its `call`-th call (before it runs, or
    after with after=True); returns the list of calls made."""
    original = getattr(owner, name)
    calls = []

    def wrapped(*a, **k):
        calls.append(a)
        if len(calls) == call and not after:
            os.kill(os.getpid(), signal.SIGTERM)
        out = original(*a, **k)
        if len(calls) == call and after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def run(workdir, *extra) -> int:
    return main_module.main([*ARGS, f"--workdir={workdir}", *extra])


PHASES = {  # phase: (what to patch, which call, after it?, the step the run stops at)
    "start-up": (lambda: (main_module, "load_config"), 1, False, 0),
    "compile": (lambda: (Trainer, "_compile_train_step"), 1, False, 1),
    "first step": (lambda: (Trainer, "_device_batch"), 1, True, 1),
    "eval": (lambda: (Trainer, "evaluate"), 1, False, 2),
    "async save": (lambda: (Checkpoints, "save"), 2, True, 2),
    "final save": (lambda: (Checkpoints, "save"), STEPS, True, STEPS),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_in_every_phase_exits_0_resumable(tmp_path, capsys, monkeypatch, phase):
    target, call, after, stop_step = PHASES[phase]
    extra = ["--config.eval.every=2"] if phase == "eval" else []
    sigterm_during(monkeypatch, *target(), call=call, after=after)
    assert run(tmp_path, *extra) == 0
    out = capsys.readouterr().out
    if stop_step == 0:
        assert "stopped by SIGTERM before the first step of this run (at step 0): nothing new " \
               "to save" in out, out
        assert steps_on_disk(tmp_path) == []
    elif stop_step < STEPS:
        assert f"stopped by SIGTERM at step {stop_step};" in out, out
        assert max(steps_on_disk(tmp_path)) == stop_step
    else:  # the run had finished its steps: it ends as usual
        assert f"done: step {STEPS}" in out and steps_on_disk(tmp_path)[-1] == STEPS
    monkeypatch.undo()
    assert run(tmp_path) == 0  # the rerun resumes (or starts) and finishes
    out = capsys.readouterr().out
    if 0 < stop_step < STEPS:
        assert f"resuming from {tmp_path}/checkpoints/{stop_step}" in out
    assert steps_on_disk(tmp_path)[-1] == STEPS


def test_sigterm_while_restoring_ends_before_the_first_step(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--max_steps=2") == 0
    sigterm_during(monkeypatch, Trainer, "_restore_newest")
    assert run(tmp_path) == 0
    assert "stopped by SIGTERM before the first step of this run (at step 2)" \
        in capsys.readouterr().out
    assert max(steps_on_disk(tmp_path)) == 2


def test_processes_agree_on_a_stop_within_the_time_bound():
    """Two processes (threads here, exchanging through a barrier as the all-gather does) with
    steps of 0.3 s and 1.1 s: their sync schedules stay identical (a diverging one would leave
    the barrier waiting: BrokenBarrierError), syncs are about `within` seconds of the slower
    process apart, and a signal on one stops both at the same step, within the bound."""
    import threading

    import numpy as np

    from trainer.signals import StopSignals

    within, slots, barrier = 5.0, [None, None], threading.Barrier(2, timeout=20)
    results, syncs = {}, {0: [], 1: []}

    def run(pid, step_seconds, signal_at):
        clock = [0.0]

        def allgather(x):
            slots[pid] = x
            barrier.wait()
            out = np.stack(list(slots))
            barrier.wait()
            syncs[pid].append(step)
            return out

        stop = StopSignals(allgather=allgather, process_count=2, clock=lambda: clock[0])
        for step in range(400):
            if signal_at is not None and clock[0] >= signal_at and not stop._caught:
                stop._caught, stop.signal = True, "SIGTERM"
            if stop.requested(step, within_seconds=within):
                results[pid] = (step, clock[0], stop.signal)
                return
            clock[0] += step_seconds
        results[pid] = (None, clock[0], None)

    threads = [threading.Thread(target=run, args=(0, 0.3, None)),
               threading.Thread(target=run, args=(1, 1.1, 60.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert syncs[0] == syncs[1] and len(syncs[0]) > 3
    (step0, _, sig0), (step1, t1, sig1) = results[0], results[1]
    assert step0 == step1 is not None  # the same step on both
    assert sig1 == "SIGTERM" and sig0 == "SIGTERM (on another process)"
    gaps = np.diff(syncs[0][2:])  # after the first steps' measurement
    assert np.all(gaps * 1.1 <= within + 1e-9) and gaps.max() == int(within / 1.1)
    assert 60.0 <= t1 <= 60.0 + within + 1.1  # the signalled process stopped within the bound
