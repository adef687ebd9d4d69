"""The Trainer end to end on 8 simulated CPU devices: sharding, resume, compilation, grad
accumulation, the NaN policy, bf16/remat and the command line."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, TINY, assert_params_close, make_tiny_config, param_arrays, run_trainer
from trainer import Trainer
from trainer.data import process_batches

STEPS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """3 steps of the tiny LM on the 2x2x2 mesh: the run the other configurations must match."""
    config = make_tiny_config(f"train.steps={STEPS}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    return run_trainer(config, tmp_path_factory.mktemp("reference"))


def test_reference_run_trains(reference):
    assert reference.result["step"] == STEPS
    assert sorted(reference.losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in reference.losses.values())
    assert set(reference.result["eval"]) >= {"loss", "bits_per_byte", "perplexity"}
    assert np.isfinite(reference.result["eval"]["loss"])


@pytest.mark.parametrize("data,fsdp,tensor", [(8, 1, 1), (1, 8, 1)])
def test_loss_equal_across_meshes(reference, tmp_path, data, fsdp, tensor):
    config = make_tiny_config(f"train.steps={STEPS}", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                              f"mesh.tensor={tensor}")
    run = run_trainer(config, tmp_path)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(run.losses[step], reference.losses[step], rtol=1e-5,
                                   err_msg=f"train loss at step {step}")
    np.testing.assert_allclose(run.result["eval"]["loss"], reference.result["eval"]["loss"], rtol=1e-5)
    assert_params_close(run.params, reference.params, rtol=1e-4, atol=2e-5)


def test_resume_equals_uninterrupted(tmp_path):
    """4 steps in one go == 2 steps, a new Trainer on the same workdir (restoring the state and
    the data-iterator position from the checkpoint), 2 more steps."""
    config = make_tiny_config("train.steps=4", "mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1")
    whole = run_trainer(config, tmp_path / "whole")

    first = run_trainer(config, tmp_path / "split", max_steps=2)
    assert first.result["step"] == 2
    with Trainer(config, str(tmp_path / "split"), quiet=True) as t:
        assert t.checkpoints.all_steps() == [2]
        assert t.step == 2  # restored, not re-initialised
    second = run_trainer(config, tmp_path / "split")
    assert second.result["step"] == 4
    assert sorted(second.losses) == [3, 4], "the resumed run must not repeat steps 1-2"

    resumed_losses = {**first.losses, **second.losses}
    for step in range(1, 5):  # steps 3-4 differ if the data iterator restarted
        np.testing.assert_array_equal(resumed_losses[step], whole.losses[step],
                                      err_msg=f"train loss at step {step}")
    assert_params_close(second.params, whole.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(second.result["eval"]["loss"], whole.result["eval"]["loss"], rtol=1e-6)


def test_train_step_compiles_once(tiny_config, tmp_path):
    """4 steps with two evaluations: one compilation of the train step, one of the eval step."""
    compiled: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        config = tiny_config("train.steps=4", "eval.every=2", "mesh.data=2", "mesh.fsdp=2",
                             "mesh.tensor=2")
        run = run_trainer(config, tmp_path)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert run.result["step"] == 4
    train = [n for n in compiled if "_train_step_fn" in n]
    evals = [n for n in compiled if "_eval_step_fn" in n]
    assert len(train) == 1, f"train step compiled {len(train)} times: {compiled}"
    assert len(evals) == 1, f"eval step compiled {len(evals)} times: {compiled}"


def test_grad_accumulation_matches_full_batch(reference, tmp_path):
    config = make_tiny_config(f"train.steps={STEPS}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                              "train.global_batch_size=8", "train.grad_accum_steps=2")
    run = run_trainer(config, tmp_path)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(run.losses[step], reference.losses[step], rtol=1e-4,
                                   err_msg=f"train loss at step {step}")
    assert_params_close(run.params, reference.params, rtol=1e-4, atol=1e-5)


def test_remat_matches_no_remat(reference, tmp_path):
    config = make_tiny_config(f"train.steps={STEPS}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                              "train.remat=true")
    run = run_trainer(config, tmp_path)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(run.losses[step], reference.losses[step], rtol=1e-5,
                                   err_msg=f"train loss at step {step}")
    assert_params_close(run.params, reference.params, rtol=1e-4, atol=2e-5)


def test_bfloat16_compute_trains(reference, tmp_path):
    config = make_tiny_config("train.steps=2", "train.compute_dtype=bfloat16")
    with Trainer(config, str(tmp_path), quiet=True) as t:
        model = t.model
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param))), \
            "bf16 compute keeps f32 parameters"
        logits, _ = model(jnp.zeros((1, 4), jnp.int32))
        assert logits.dtype == jnp.float32
        r = t.fit()
    assert r["step"] == 2 and np.isfinite(r["loss"]) and np.isfinite(r["eval"]["loss"])
    # same data and init: bf16 is close to, not equal to, the f32 loss
    np.testing.assert_allclose(r["loss"], reference.losses[2], rtol=5e-2)


# ----------------------------------------------------------------------------- nan policy
def _poison_loss(monkeypatch, *, bad_ids=None):
    """Makes LMTask.loss non-finite (loss and gradients): always, or when the batch holds an
    example whose id is in `bad_ids`."""
    from models.lm import LMTask

    original = LMTask.loss

    def poisoned(self, model, batch):
        loss, metrics = original(self, model, batch)
        if bad_ids is None:
            bad = jnp.bool_(True)
        else:
            bad = jnp.any(batch["id"][:, None] == jnp.asarray(bad_ids)[None, :])
        return loss * jnp.where(bad, jnp.nan, 1.0), metrics

    monkeypatch.setattr(LMTask, "loss", poisoned)


def _ids_of_batch(config, index: int) -> np.ndarray:
    """Example ids of the index-th (0-based) global training batch."""
    from models.lm import LMTask
    batches = process_batches(LMTask(config).train_data(), config.train.global_batch_size,
                              process_index=0, process_count=1)
    return next(itertools.islice(iter(batches), index, None))["id"]


def test_nan_skip_leaves_params_unchanged(tiny_config, tmp_path, monkeypatch):
    _poison_loss(monkeypatch)
    config = tiny_config("train.steps=3", "train.nan_policy=skip")
    with Trainer(config, str(tmp_path), quiet=True) as t:
        initial = param_arrays(t.model)
        r = t.fit()
        final = param_arrays(t.model)
        _, opt = nnx.merge(t.graphdef, t.state["nnx"])
        assert int(opt.step[...]) == 0, "no optimizer update may be applied"
        assert int(t.state["first_nonfinite"]) == 1
    assert r["step"] == 3
    assert r["metrics"]["nonfinite_steps"] == 3
    for k in initial:
        np.testing.assert_array_equal(final[k], initial[k], err_msg=k)


def test_nan_skip_skips_only_the_bad_step(tiny_config, tmp_path, monkeypatch):
    config = tiny_config("train.steps=3", "train.nan_policy=skip")
    _poison_loss(monkeypatch, bad_ids=_ids_of_batch(config, 1))  # step 2's batch
    run = run_trainer(config, tmp_path)
    assert np.isfinite(run.losses[1]) and np.isnan(run.losses[2]) and np.isfinite(run.losses[3])
    assert [run.train_metrics[s]["nonfinite_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    with Trainer(config, str(tmp_path), quiet=True) as t:  # restores the final checkpoint
        _, opt = nnx.merge(t.graphdef, t.initial_state()["nnx"])
        assert int(opt.step[...]) == 2, "steps 1 and 3 update, step 2 does not"
        assert int(t.state["nonfinite"]) == 1
        assert int(t.state["first_nonfinite"]) == 2


def test_nan_stop_raises_with_step(tiny_config, tmp_path, monkeypatch):
    config = tiny_config("train.steps=3", "train.nan_policy=stop")
    _poison_loss(monkeypatch, bad_ids=_ids_of_batch(config, 1))  # step 2's batch
    with Trainer(config, str(tmp_path), quiet=True) as t:
        with pytest.raises(FloatingPointError, match=r"step 2\b"):
            t.fit()
        assert t.step == 2, "training stops at the bad step"


# ----------------------------------------------------------------------------- command line
def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.mark.slow
def test_cli_trains_and_writes_checkpoints_and_tensorboard(tmp_path):
    workdir = tmp_path / "run"
    p = _cli("--config=configs/lm.py:tiny", f"--workdir={workdir}", "--config.train.steps=2",
             "--config.model.num_layers=1", "--config.data.seq_len=32", "--config.eval.batches=1",
             "--config.sample.max_new_tokens=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done: step 2" in p.stdout
    assert "sample" in p.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


def test_cli_misspelt_override_fails_listing_valid_fields(tmp_path):
    p = _cli(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.stesp=3", timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "stesp" in p.stderr
    assert "train.steps" in p.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_unknown_variant_fails_cleanly(tmp_path):
    p = _cli(f"--config={TINY.rsplit(':', 1)[0]}:huge", f"--workdir={tmp_path}", timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "huge" in p.stderr and "tiny" in p.stderr
    assert "Traceback" not in p.stderr
