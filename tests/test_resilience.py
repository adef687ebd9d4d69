"""Runs that survive: resume on another mesh, preemption signals, kill -9 (also during an async
save), unreadable checkpoints, several processes, the dry run and bad workdirs.

Subprocesses are real `python -m trainer.main` runs where a process must die or several must
cooperate; the rest runs in-process on the 8 simulated devices.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import (REPO_ROOT, TEST_OVERRIDES, TINY, make_tiny_config, run_trainer,
                      steps_on_disk, xla_flags)
from trainer import ConfigError, Trainer

STEPS = 4
CLI_OVERRIDES = [f"--config.{o}" for o in TEST_OVERRIDES]


# ----------------------------------------------------------------------------- helpers
def cli(workdir, *args: str, devices: int = 8) -> list[str]:
    return [sys.executable, "-m", "trainer.main", f"--config={TINY}", f"--workdir={workdir}",
            *CLI_OVERRIDES, *args]


def env(devices: int = 8) -> dict[str, str]:
    e = dict(os.environ)
    e["XLA_FLAGS"] = xla_flags(devices)
    e["PYTHONPATH"] = REPO_ROOT
    return e


def train_losses(workdir) -> dict[int, float]:
    """Train losses logged to workdir/metrics.jsonl (the last value of each step)."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a line being written
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def wait_for_step(proc, workdir, step: int, timeout: float = 180.0) -> int:
    """Waits until the subprocess has logged `step`; returns the newest logged step."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        losses = train_losses(workdir)
        if losses and max(losses) >= step:
            return max(losses)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """4 uninterrupted steps on the data=8 mesh (checkpoint at step 2): the run to match."""
    config = make_tiny_config(f"train.steps={STEPS}", "checkpoint.every=2", "mesh.data=8")
    return run_trainer(config, tmp_path_factory.mktemp("reference"))


def assert_losses_match(losses: dict[int, float], reference, steps, rtol=1e-5):
    for step in steps:
        np.testing.assert_allclose(losses[step], reference.losses[step], rtol=rtol,
                                   err_msg=f"train loss at step {step}")


# ----------------------------------------------------------------------------- 1. reshard
@pytest.mark.parametrize("mesh", ["data=4,tensor=2", "fsdp=8", "single device"])
def test_resume_on_another_mesh(reference, tmp_path, mesh):
    """Saved on data=8 at step 2, resumed on another mesh: steps 3-4 match the uninterrupted run
    and the data continues where it stopped (every example id once, in the same order)."""
    first = run_trainer(make_tiny_config(f"train.steps={STEPS}", "checkpoint.every=2",
                                         "mesh.data=8"), tmp_path, max_steps=2)
    if mesh == "single device":
        overrides, devices = ["mesh.data=1"], jax.devices()[:1]
    else:
        overrides = ["mesh.data=1"] + [f"mesh.{kv}" for kv in mesh.split(",")]
        devices = None
    second = run_trainer(make_tiny_config(f"train.steps={STEPS}", "checkpoint.every=2",
                                          *overrides), tmp_path, devices=devices)
    assert sorted(second.losses) == [3, 4]
    assert_losses_match(second.losses, reference, [3, 4])
    seen = np.concatenate(first.ids + second.ids)
    np.testing.assert_array_equal(seen, np.concatenate(reference.ids))
    assert len(set(seen.tolist())) == len(seen), "an example was seen twice"


# ----------------------------------------------------------------------------- 2. preemption
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_0(tmp_path, sig):
    proc = subprocess.Popen(cli(tmp_path, "--config.train.steps=100000"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and sig.name in stopped[0], out[-2000:]
    step = max(steps_on_disk(tmp_path))
    assert f"at step {step};" in stopped[0] and step >= 3
    assert max(train_losses(tmp_path)) == step, "the checkpoint is of the last finished step"
    if sig == signal.SIGTERM:  # a restart resumes from that step
        p = subprocess.run(cli(tmp_path, f"--max_steps={step + 1}", "--config.train.steps=100000"),
                           env=env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"resuming from {tmp_path}/checkpoints/{step}" in p.stdout
        assert max(steps_on_disk(tmp_path)) == step + 1


# ----------------------------------------------------------------------------- 3. crashes
def test_kill_9_at_random_moments_never_loses_the_workdir(tmp_path):
    """SIGKILL at several moments of a run that saves (asynchronously) every step: each restart
    resumes from the newest complete checkpoint and says which one."""
    rng = np.random.default_rng(0)
    args = ["--config.train.steps=100000", "--config.checkpoint.every=1"]
    target = 2
    for attempt in range(3):
        before = steps_on_disk(tmp_path)
        proc = subprocess.Popen(cli(tmp_path, *args), env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for_step(proc, tmp_path, target)
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.kill()
        out, _ = proc.communicate(timeout=60)
        if before:
            assert f"resuming from {tmp_path}/checkpoints/{max(before)}\n" in out, out[-2000:]
        target = max(train_losses(tmp_path)) + 2
    newest = max(steps_on_disk(tmp_path))
    p = subprocess.run(cli(tmp_path, *args, f"--max_steps={newest + 1}"), env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {tmp_path}/checkpoints/{newest}\n" in p.stdout


KILL_DURING_SAVE = """
import os, signal, sys
import trainer.checkpoint as ck
save = ck.Checkpoints.save
def save_then_die(self, step, *args, **kw):
    save(self, step, *args, **kw)  # async: returns while the files are being written
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
ck.Checkpoints.save = save_then_die
from trainer.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_async_save_skips_the_incomplete_checkpoint(tmp_path):
    args = cli(tmp_path, "--config.train.steps=6", "--config.checkpoint.every=1")
    p = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args[3:]], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert steps_on_disk(tmp_path) == [1, 2]
    leftovers = [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]
    assert leftovers, "the kill should have interrupted the save of step 3"
    p = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "incomplete checkpoint" in p.stderr and leftovers[0] in p.stderr
    assert f"resuming from {tmp_path}/checkpoints/2\n" in p.stdout
    assert max(steps_on_disk(tmp_path)) == 6


@pytest.mark.parametrize("damage", ["truncate array files", "delete metadata"])
def test_unreadable_checkpoint_is_skipped_with_a_warning(reference, tmp_path, capsys, damage):
    config = make_tiny_config(f"train.steps={STEPS}", "checkpoint.every=2", "mesh.data=8")
    shutil.copytree(reference.workdir, tmp_path, dirs_exist_ok=True)
    assert steps_on_disk(tmp_path) == [2, 4]
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    if damage == "truncate array files":
        for root, _, files in os.walk(state_dir):
            for f in files:
                if "ocdbt" in root or f.startswith("manifest") or root.endswith("/d"):
                    open(os.path.join(root, f), "wb").close()
    else:
        for f in ("_METADATA", "_sharding"):
            (state_dir / f).unlink()
    capsys.readouterr()
    with Trainer(config, str(tmp_path), quiet=True) as t:
        assert t.step == 2, "must fall back to the newest readable checkpoint"
    err = capsys.readouterr().err
    assert "unreadable checkpoint" in err and f"{tmp_path}/checkpoints/4" in err
    aside = os.listdir(tmp_path / "checkpoints.unreadable")
    assert len(aside) == 1 and aside[0].startswith("4-"), "kept for inspection, not deleted"
    # training on saves step 4 again without colliding with the bad one, and matches the reference
    again = run_trainer(config, tmp_path)
    assert_losses_match(again.losses, reference, [3, 4])
    assert steps_on_disk(tmp_path) == [2, 4]


# ----------------------------------------------------------------------------- 4. processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(workdir, *args: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(
        cli(workdir, *args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}"), env=env(devices=4), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in (0, 1)]


def finish(procs) -> list[str]:
    """Waits for the processes; all must exit 0. Returns their stdout."""
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process rc {p.returncode}:\n{err[-3000:]}"
    return [out for out, _ in outs]


def run_two_processes(workdir, *args: str) -> None:
    finish(start_two_processes(workdir, *args))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    procs = start_two_processes(tmp_path, "--config.train.steps=100000")
    wait_for_step(procs[0], tmp_path, 3)
    procs[1].send_signal(signal.SIGTERM)  # process 0 learns of it through the all-gather
    out0, _ = finish(procs)
    step = max(steps_on_disk(tmp_path))
    assert f"stopped by SIGTERM (on another process) at step {step};" in out0


def test_two_processes_match_one_and_checkpoints_move_between_them(reference, tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices; a checkpoint of 2 processes resumes in
    1 process, and one of 1 process resumes in 2."""
    two = tmp_path / "two"
    run_two_processes(two, f"--config.train.steps={STEPS}", "--config.checkpoint.every=2")
    losses = train_losses(two)
    assert sorted(losses) == [1, 2, 3, 4]
    assert_losses_match(losses, reference, range(1, STEPS + 1))
    assert steps_on_disk(two) == [2, 4]

    # 2 -> 1: resume the 2-process checkpoint of step 2 in this (1-process) pytest process
    moved = tmp_path / "two_to_one"
    shutil.copytree(two, moved)
    shutil.rmtree(moved / "checkpoints" / "4")
    os.remove(moved / "metrics.jsonl")
    config = make_tiny_config(f"train.steps={STEPS}", "checkpoint.every=2", "mesh.data=8")
    one = run_trainer(config, moved)
    assert sorted(one.losses) == [3, 4]
    assert_losses_match(one.losses, reference, [3, 4])
    np.testing.assert_array_equal(np.concatenate(one.ids), np.concatenate(reference.ids[2:]))

    # 1 -> 2: the reference's checkpoint of step 2, continued by 2 processes
    back = tmp_path / "one_to_two"
    shutil.copytree(reference.workdir, back)
    shutil.rmtree(back / "checkpoints" / "4")
    run_two_processes(back, f"--config.train.steps={STEPS}", "--config.checkpoint.every=2")
    losses = train_losses(back)
    assert sorted(losses) == [3, 4]
    assert_losses_match(losses, reference, [3, 4])


# ----------------------------------------------------------------------------- 5. dry run
def test_dry_run_reports_shapes_specs_memory_and_flops(tmp_path):
    config = make_tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    workdir = tmp_path / "never_created"
    with Trainer(config, str(workdir), dry_run=True) as t:
        report = t.dry_run()
    for name in ("embed/embedding", "blocks/0/attn/q_proj/kernel", "blocks/0/mlp/w2/kernel",
                 "lm_head/kernel"):
        assert name in report
    # q_proj (64, 64) over fsdp x tensor = 2 x 2: 32 x 32 f32 per device
    q_line = next(line for line in report.splitlines() if "attn/q_proj/kernel" in line)
    assert "P('fsdp', 'tensor')" in q_line and q_line.rstrip().endswith("4,096")
    assert "optimizer state" in report and "temporaries" in report and "GFLOP" in report
    assert not workdir.exists(), "a dry run writes nothing"


def test_dry_run_lists_every_divisibility_problem(tmp_path):
    config = make_tiny_config("mesh.data=1", "mesh.tensor=8", "model.d_model=36",
                              "model.head_dim=16")
    with Trainer(config, str(tmp_path / "w"), dry_run=True) as t:
        report = t.dry_run()
    assert "num_heads=4" in report and "num_kv_heads=2" in report
    assert "embed" in report and "not compiled" in report
    # parameters fsdp=8 cannot split: each once, under its model path (not again for Adam's
    # mu / nu, whose copies have the same shapes)
    config = make_tiny_config("mesh.data=1", "mesh.fsdp=8", "model.d_model=36",
                              "model.head_dim=16")
    with Trainer(config, str(tmp_path / "w"), dry_run=True) as t:
        report = t.dry_run()
    listed = [" ".join(line.split()[:3]) for line in report.splitlines()
              if "is not divisible by mesh axes" in line]
    assert len(listed) == 9 and len(set(listed)) == 9, listed  # 7 projections, embed, lm_head
    assert "embed/embedding dim 1" in listed and "lm_head/kernel dim 0" in listed
    assert "opt_state" not in report and not any(n[:2] in ("0/", "1/") for n in listed)


def test_dry_run_command_line(tmp_path):
    p = subprocess.run(cli(tmp_path / "w", "--dry_run", "--config.mesh.data=1",
                           "--config.mesh.fsdp=8"), env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "P('fsdp'" in p.stdout and "bytes/device" in p.stdout and "GFLOP" in p.stdout
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- 7. bad input
def test_workdir_of_a_different_model_names_parameters_and_suggests_init_from(reference, tmp_path):
    shutil.copytree(reference.workdir, tmp_path, dirs_exist_ok=True)
    config = make_tiny_config(f"train.steps={STEPS}", "mesh.data=8", "model.mlp_dim=256")
    with pytest.raises(ConfigError) as e:
        Trainer(config, str(tmp_path), quiet=True).initial_state()
    assert "\n  model.mlp_dim: 128 -> 256\n" in str(e.value)  # the config's change first
    # allowed on purpose, the arrays still cannot resume: each one named
    config = make_tiny_config(f"train.steps={STEPS}", "mesh.data=8", "model.mlp_dim=256",
                              "checkpoint.allow_changes=model.mlp_dim")
    with pytest.raises(ConfigError) as e:
        Trainer(config, str(tmp_path), quiet=True).initial_state()
    message = str(e.value)
    assert "mlp/w1/kernel" in message and "(64, 128) in the checkpoint" in message
    assert "init_from" in message and "attn/q_proj" not in message
    assert steps_on_disk(tmp_path) == [2, 4], "the checkpoints are untouched"


def test_data_path_gone_on_resume_fails_clearly(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    config = make_tiny_config(f"train.steps={STEPS}", "checkpoint.every=2", f"data.paths={corpus}")
    run_trainer(config, tmp_path / "run", max_steps=2)
    shutil.rmtree(corpus)
    with pytest.raises(ConfigError, match="data.paths") as e:
        Trainer(config, str(tmp_path / "run"), quiet=True).fit()
    assert str(corpus) in str(e.value)
    assert steps_on_disk(tmp_path / "run") == [2]
