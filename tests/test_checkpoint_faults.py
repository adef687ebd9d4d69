"""Faults when resuming: storage errors are retried and never cost a checkpoint, corrupt steps
are set aside only for an older readable one, a workdir with no readable checkpoint never
silently restarts at step 0, and a resume that would change the model, the data stream or the
schedule is refused with every difference listed (issue 25, items 1 and 2)."""
from __future__ import annotations

import os
import shutil

import orbax.checkpoint as ocp
import pytest

from conftest import make_tiny_config, run_trainer, steps_on_disk
from trainer.checkpoint import (CheckpointError, Checkpoints, first_line, is_data_error,
                                is_transient)
from trainer.config import ConfigError, resume_changes

STEPS, SAVED = 4, 2  # the run's length, and the step its checkpoints reach (1 and 2)
BASE = (f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.retry_seconds=0.01")


def config(*overrides: str):
    return make_tiny_config(*BASE, *overrides)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-step run stopped at step 2, with checkpoints 1 and 2."""
    workdir = tmp_path_factory.mktemp("saved")
    run_trainer(config(), workdir, max_steps=SAVED)
    return str(workdir)


@pytest.fixture
def workdir(saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    return tmp_path


def resumed_step(workdir, *overrides: str) -> int:
    from trainer import Trainer
    with Trainer(config(*overrides), str(workdir), quiet=True) as t:
        return t.step


def flaky_restore(monkeypatch, failures: int | None, error=OSError(5, "Input/output error")):
    """Orbax restores raise `error` `failures` times (None: always), then work; returns the
    list of failed calls."""
    restore = ocp.CheckpointManager.restore
    calls = []

    def flaky(self, *a, **k):
        if failures is None or len(calls) < failures:
            calls.append(a)
            raise error
        return restore(self, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    return calls


def assert_nothing_moved(workdir):
    assert steps_on_disk(workdir) == [1, 2]
    assert not os.path.exists(workdir / "checkpoints.unreadable")


# ----------------------------------------------------------------------------- 1. storage errors
def test_one_storage_error_is_retried_and_resumes_the_newest_step(workdir, monkeypatch, capsys):
    calls = flaky_restore(monkeypatch, failures=1)
    assert resumed_step(workdir) == SAVED
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert "read on a later try: checkpoint 2: OSError" in err
    assert_nothing_moved(workdir)


def test_a_storage_outage_stops_the_run_naming_the_step_and_moves_nothing(workdir, monkeypatch):
    calls = flaky_restore(monkeypatch, failures=None)
    with pytest.raises(CheckpointError, match=r"could not read checkpoint 2 .* after 4 tries: "
                                              r"OSError: \[Errno 5\] Input/output error"):
        resumed_step(workdir, "checkpoint.restore_retries=3")
    assert len(calls) == 4, "one try and three retries, then it stops"
    assert_nothing_moved(workdir)


def test_the_cli_reports_an_outage_in_one_message_with_exit_1(workdir, monkeypatch, capsys):
    from conftest import TEST_OVERRIDES, TINY
    from trainer.main import main

    flaky_restore(monkeypatch, failures=None)
    args = [f"--config={TINY}", f"--workdir={workdir}",
            *[f"--config.{o}" for o in (*TEST_OVERRIDES, *BASE)],
            "--config.checkpoint.restore_retries=1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not read checkpoint 2") and "Traceback" not in err
    assert_nothing_moved(workdir)


# ----------------------------------------------------------------------------- 1. corruption
def truncate_arrays(step_dir) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if "ocdbt" in root or f.startswith("manifest") or root.endswith("/d"):
                open(os.path.join(root, f), "wb").close()


def test_a_corrupt_newest_step_is_set_aside_once_an_older_one_reads(workdir, capsys):
    truncate_arrays(workdir / "checkpoints" / "2")
    assert resumed_step(workdir) == 1
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "skipping unreadable" in line)
    assert f"checkpoint 2 ({workdir}/checkpoints/2): " in warning and "empty file" in warning
    assert len(warning) < 400 and "kvstore" not in err, "one line, not a TensorStore spec"
    assert steps_on_disk(workdir) == [1]
    assert [d.split("-")[0] for d in os.listdir(workdir / "checkpoints.unreadable")] == ["2"]


def test_no_readable_checkpoint_is_an_error_unless_from_scratch(workdir, capsys):
    for step in (1, 2):
        os.unlink(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
    with pytest.raises(CheckpointError, match=r"holds checkpoints 1, 2 and none of them is "
                                              r"readable.*nothing was moved.*from_scratch=True"):
        resumed_step(workdir)
    assert_nothing_moved(workdir)
    assert resumed_step(workdir, "checkpoint.from_scratch=True") == 0
    assert steps_on_disk(workdir) == []
    assert sorted(d.split("-")[0] for d in os.listdir(workdir / "checkpoints.unreadable")) \
        == ["1", "2"], "kept for inspection, not deleted"


def test_errors_are_classified_down_the_chain():
    assert is_transient(OSError(5, "Input/output error"))
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert not is_transient(FileNotFoundError(2, "gone"))
    assert not is_transient(ValueError("DATA_LOSS: Error reading ..."))
    assert is_data_error(ValueError("DATA_LOSS: Error reading ...")) and is_data_error(KeyError("x"))
    assert not is_data_error(OSError(5, "EIO")) and not is_data_error(RuntimeError("?"))
    assert is_transient(ValueError("UNAVAILABLE: the bucket did not answer"))
    try:
        try:
            raise OSError(116, "Stale file handle")
        except OSError as inner:
            raise RuntimeError("orbax restore failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    long = ValueError("NOT_FOUND: Error opening \"zarr3\" driver: " + "x" * 500 + "\n{spec...}")
    assert first_line(long).startswith("ValueError: NOT_FOUND") and len(first_line(long)) == 200


# ----------------------------------------------------------------------------- 2. resume changes
@pytest.mark.parametrize("overrides,listed", [
    (("data.seq_len=64",), ["data.seq_len: 32 -> 64"]),
    (("train.global_batch_size=4", "mesh.data=4", "mesh.tensor=2", "model.d_model=32"),
     ["model.d_model: 64 -> 32", "train.global_batch_size: 8 -> 4"]),
    (("train.steps=5",), ["train.steps: 4 -> 5 moves the schedule's horizon "
                          "(set train.schedule_steps=4 to keep the old schedule)"]),
    (("seed=3", "train.lr=0.01"), ["seed: 0 -> 3", "train.lr: 0.003 -> 0.01"]),
])
def test_a_resume_that_changes_the_run_is_refused_listing_every_change(workdir, overrides, listed):
    with pytest.raises(ConfigError) as e:
        resumed_step(workdir, *overrides)
    msg = str(e.value)
    for line in listed:
        assert f"\n  {line}" in msg, msg
    fields = ",".join(line.split(":")[0] for line in listed)
    assert msg.endswith(f"--config.checkpoint.allow_changes={fields}")
    assert_nothing_moved(workdir)


def test_allowed_and_free_changes_resume(workdir, saved):
    c = Checkpoints(saved, async_save=False)
    old = c.restore_config(SAVED)
    c.close()
    # where and how it runs: free
    assert resume_changes(old, config("eval.every=7", "checkpoint.max_to_keep=9",
                                      "train.log_every=5", "train.grad_accum_steps=2",
                                      "mesh.fsdp=1", "train.remat=True")) == []
    # more steps on an explicit schedule: free; the same horizon by another route is too
    assert resume_changes(dict(old, train=dict(old["train"], schedule_steps=10)),
                          config("train.steps=10", "train.schedule_steps=10")) == []
    # allowed on purpose, by field or by group
    assert resume_changes(old, config("data.seq_len=64", "train.lr=0.01",
                                      "checkpoint.allow_changes=data,train.lr")) == []
    assert resumed_step(workdir, "train.lr=0.01", "checkpoint.allow_changes=train.lr") == SAVED
    # evaluating the checkpoint (nothing to train): its data and schedule do not matter
    assert resume_changes(old, config("train.steps=0", "data.seq_len=64", "train.lr=0.01"),
                          training=False) == []
    assert resume_changes(old, config("train.steps=0", "model.d_model=32"), training=False) \
        == ["model.d_model: 64 -> 32"]


def test_an_allowed_batch_size_change_goes_on_at_the_next_example(workdir):
    """Saved after 2 steps of 8 examples; resumed with a global batch of 4 (allowed): the next
    batch is examples 16-19 of the same stream, and a later resume keeps counting examples."""
    from trainer.data import process_batches
    from trainer.task import get_task

    small = ("train.global_batch_size=4", "mesh.data=4", "mesh.tensor=2",
             "checkpoint.allow_changes=train.global_batch_size,train.steps")
    run = run_trainer(config(*small, "train.steps=3"), workdir)
    assert sorted(run.losses) == [3]
    again = run_trainer(config(*small, "train.steps=4"), workdir)
    cfg = config(*small)
    stream = iter(process_batches(get_task(cfg.task)(cfg).train_data(), 4, prefetch=0))
    batches = [next(stream)["id"].tolist() for _ in range(6)]
    assert [b.tolist() for b in run.ids + again.ids] == batches[4:6]
