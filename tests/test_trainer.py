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
from trainer import ConfigError, Trainer
from trainer.data import process_batches

STEPS = 4
REFERENCE_MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """4 steps of the tiny LM on the 2x2x2 mesh (evaluating at steps 2 and 4): the run the other
    configurations must match. Records the names of the functions XLA compiled meanwhile."""
    compiled: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name", ""))

    config = make_tiny_config(f"train.steps={STEPS}", "eval.every=2", *REFERENCE_MESH)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run = run_trainer(config, tmp_path_factory.mktemp("reference"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    run.compiled = compiled
    return run


def test_reference_run_trains(reference):
    assert reference.result["step"] == STEPS
    assert sorted(reference.losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for v in reference.losses.values())
    assert reference.losses[STEPS] < reference.losses[1]
    assert set(reference.result["eval"]) >= {"loss", "bits_per_byte", "perplexity"}
    assert np.isfinite(reference.result["eval"]["loss"])


def test_train_step_compiles_once(reference):
    """4 steps and two evaluations: one compilation of the train step, one of the eval step."""
    train = [n for n in reference.compiled if "_train_step_fn" in n]
    evals = [n for n in reference.compiled if "_eval_step_fn" in n]
    assert len(train) == 1, f"train step compiled {len(train)} times: {reference.compiled}"
    assert len(evals) == 1, f"eval step compiled {len(evals)} times: {reference.compiled}"


@pytest.mark.parametrize("data,fsdp,tensor", [(8, 1, 1), (1, 8, 1)])
def test_loss_equal_across_meshes(reference, tmp_path, data, fsdp, tensor):
    """data x fsdp x tensor = 8x1x1 and 1x8x1 train like the 2x2x2 reference."""
    config = make_tiny_config(f"train.steps={STEPS}", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                              f"mesh.tensor={tensor}")
    run = run_trainer(config, tmp_path)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(run.losses[step], reference.losses[step], rtol=1e-5,
                                   err_msg=f"train loss at step {step}")
    np.testing.assert_allclose(run.result["eval"]["loss"], reference.result["eval"]["loss"], rtol=1e-5)
    # Adam's normalised updates amplify reduction-order noise in tiny gradients: atol ~1% of lr
    assert_params_close(run.params, reference.params, rtol=1e-4, atol=2e-5)


def test_resume_equals_uninterrupted(reference, tmp_path):
    """2 steps, then a new Trainer on the same workdir (restoring the state and the data-iterator
    position from the checkpoint) for 2 more == the 4 uninterrupted steps of the reference."""
    config = make_tiny_config(f"train.steps={STEPS}", "eval.every=2", *REFERENCE_MESH)
    first = run_trainer(config, tmp_path, max_steps=2)
    assert first.result["step"] == 2
    with Trainer(config, str(tmp_path), quiet=True) as t:
        assert t.checkpoints.all_steps() == [2]
        assert t.step == 2  # restored, not re-initialised
    second = run_trainer(config, tmp_path)
    assert second.result["step"] == STEPS
    assert sorted(second.losses) == [3, 4], "the resumed run must not repeat steps 1-2"

    resumed_losses = {**first.losses, **second.losses}
    for step in range(1, STEPS + 1):  # steps 3-4 differ if the data iterator restarted
        np.testing.assert_array_equal(resumed_losses[step], reference.losses[step],
                                      err_msg=f"train loss at step {step}")
    assert_params_close(second.params, reference.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(second.result["eval"]["loss"], reference.result["eval"]["loss"],
                               rtol=1e-6)

    # rerunning the finished run trains nothing: it restores, evaluates and keeps its checkpoints
    again = run_trainer(config, tmp_path)
    assert again.result["step"] == STEPS and again.losses == {}
    assert_params_close(again.params, reference.params, rtol=0, atol=0)
    np.testing.assert_allclose(again.result["eval"]["loss"], second.result["eval"]["loss"], rtol=1e-6)
    with Trainer(config, str(tmp_path), quiet=True) as t:
        assert t.checkpoints.all_steps() == [2, STEPS]


def test_model_is_a_snapshot_that_survives_training(tiny_config, tmp_path):
    """`trainer.model` stays usable (and unchanged) after later steps donate the train state;
    fit() in two parts on one Trainer goes on where the first part stopped."""
    config = tiny_config("train.steps=2")
    tokens = jnp.zeros((1, 4), jnp.int32)
    with Trainer(config, str(tmp_path), quiet=True) as t:
        snapshot = t.model
        initial = param_arrays(snapshot)
        logits_before, _ = snapshot(tokens)
        assert t.fit(max_steps=1)["step"] == 1
        assert t.fit()["step"] == 2
        donated = [x for x in jax.tree.leaves(nnx.state(snapshot)) if x.is_deleted()]
        assert not donated, (f"{len(donated)} arrays of trainer.model were donated to the train "
                             "step (the model aliases the train state)")
        logits_after, _ = snapshot(tokens)
        np.testing.assert_array_equal(logits_after, logits_before)
        assert_params_close(param_arrays(snapshot), initial, rtol=0, atol=0)
        assert any(np.any(a != b) for a, b in zip(param_arrays(t.model).values(), initial.values()))


def test_hooks_run_on_their_cadence_and_the_state_is_typed(tiny_config, tmp_path):
    """The loop's logging, checkpoints and evaluation are hooks (in that order); one added from
    Python runs every `every` steps and once at the end unless it just ran; the loop state is a
    TrainState pytree."""
    from trainer.state import TrainState

    config = tiny_config("train.steps=5", "train.log_every=1", "eval.every=2",
                         "checkpoint.every=0")
    calls, finals = [], []
    with Trainer(config, str(tmp_path), quiet=True) as t:
        assert [h.name for h in t.hooks] == ["log", "checkpoint", "eval"]
        t.add_hook(lambda tr, ev: calls.append((ev.step, ev.final, sorted(ev.metrics))), every=2)
        t.add_hook(lambda tr, ev: finals.append(ev.step), every=0, name="only_at_the_end")
        result = t.fit()
        assert isinstance(t.state, TrainState) and int(t.state.step) == 5
        assert t.checkpoints.all_steps() == [5]  # checkpoint.every=0: only at the end
    assert [c[:2] for c in calls] == [(2, False), (4, False), (5, True)]
    assert "loss" in calls[0][2] and calls[-1][2] == []
    assert finals == [5]
    assert result["step"] == 5 and "loss" in result["eval"] and np.isfinite(result["loss"])


# ----------------------------------------------------------------------------- init_from
@pytest.mark.parametrize("source", ["workdir", "checkpoints"])
def test_init_from_copies_parameters_of_another_run(reference, tiny_config, tmp_path, source):
    """A new run (here on another mesh) starts from the reference's final parameters, at step 0
    with a fresh optimizer; `init_from` may name the run's workdir or its checkpoints/."""
    path = reference.workdir if source == "workdir" else os.path.join(reference.workdir, "checkpoints")
    config = tiny_config("mesh.data=8", f"init_from={path}")
    with Trainer(config, str(tmp_path), quiet=True) as t:
        assert t.step == 0
        assert_params_close(param_arrays(t.model), reference.params, rtol=0, atol=0)
        _, opt = nnx.merge(t.graphdef, t.state.nnx)
        assert int(opt.step[...]) == 0
        mu = [x for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if getattr(x, "ndim", 0) >= 2]
        assert mu and all(not np.any(np.asarray(x)) for x in mu), "optimizer moments start at 0"


def test_init_from_a_different_model_names_the_mismatched_parameters(reference, tiny_config, tmp_path):
    config = tiny_config(*REFERENCE_MESH, "model.mlp_dim=256", f"init_from={reference.workdir}")
    with pytest.raises(ConfigError) as e:
        with Trainer(config, str(tmp_path), quiet=True) as t:
            t.fit()
    message = str(e.value)
    assert "init_from" in message and "mlp" in message and "256" in message
    assert "the 'lm' task maps only equal shapes" in message  # the LM does not grow
    assert "q_proj" not in message, "only the mismatched parameters are listed"


def test_state_names_keep_submodules_called_value():
    """init_from matches arrays by name: nnx.MultiHeadAttention's `value` projection must not
    collapse onto its parent's name (only the Variable's own trailing 'value' is dropped)."""
    from jax.tree_util import DictKey, GetAttrKey

    from trainer.checkpoint import by_name, path_name

    assert path_name((DictKey("attn"), DictKey("value"), DictKey("kernel"),
                      GetAttrKey("value"))) == "attn/value/kernel"
    mha = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    names = by_name(nnx.state(mha, nnx.Param))
    assert len(names) == len(jax.tree.leaves(nnx.state(mha, nnx.Param))) == 8
    assert "value/kernel" in names and "query/kernel" in names


def test_eval_only_run_evaluates_the_source(reference, tiny_config, tmp_path):
    """train.steps=0 with init_from: no step, no checkpoint; the eval metrics are the source's."""
    config = tiny_config(*REFERENCE_MESH, "train.steps=0", f"init_from={reference.workdir}")
    with Trainer(config, str(tmp_path), quiet=True) as t:
        result = t.fit()
        assert result["step"] == 0 and t.checkpoints.latest_step() is None
    assert result["eval"]["loss"] == pytest.approx(reference.result["eval"]["loss"], rel=1e-6)


def test_task_eval_hooks_see_every_eval_example(tiny_config, tmp_path):
    """eval_outputs are collected over the whole eval run (eval.batches micro-batches) and fed
    to eval_metrics / eval_images; their metrics join the loss metrics."""
    from models.lm import LMTask

    class Collecting(LMTask):
        def eval_outputs(self, model, batch):
            return {"id": batch["id"], "first": batch["tokens"][:, 0]}

        def eval_metrics(self, outputs):
            self.seen = outputs
            return {"examples": float(len(outputs["id"]))}

        def eval_images(self, outputs):
            return {"first_tokens": np.broadcast_to(outputs["first"].astype(np.uint8)[:, None, None],
                                                    (len(outputs["first"]), 2, 3))}

    config = tiny_config("eval.batches=2", "mesh.data=8")
    with Trainer(config, str(tmp_path), quiet=True) as t:
        t.task = Collecting(config)
        ev = t.evaluate()
        images = t.last_eval_images
    it = iter(process_batches(t.task.eval_data(), t.micro_batch, prefetch=0))
    want = [next(it) for _ in range(2)]
    np.testing.assert_array_equal(t.task.seen["id"], np.concatenate([b["id"] for b in want]))
    np.testing.assert_array_equal(t.task.seen["first"],
                                  np.concatenate([b["tokens"][:, 0] for b in want]))
    assert ev["examples"] == 2 * t.micro_batch and "loss" in ev and "bits_per_byte" in ev
    assert images["first_tokens"].shape == (2 * t.micro_batch, 2, 3)


def test_init_from_without_checkpoint_is_a_config_error(tiny_config, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    config = tiny_config(f"init_from={empty}")
    with pytest.raises(ConfigError, match="init_from"):
        with Trainer(config, str(tmp_path / "run"), quiet=True) as t:
            t.fit()


def test_grad_accumulation_matches_full_batch(reference, tmp_path):
    """global batch 8 as 2 micro-batches of 4 == one batch of 8."""
    config = make_tiny_config(f"train.steps={STEPS}", *REFERENCE_MESH, "train.global_batch_size=8",
                              "train.grad_accum_steps=2")
    run = run_trainer(config, tmp_path)
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(run.losses[step], reference.losses[step], rtol=1e-4,
                                   err_msg=f"train loss at step {step}")
    assert_params_close(run.params, reference.params, rtol=1e-4, atol=1e-5)
    # same parameters, same eval.batches: the eval set must not depend on grad_accum_steps
    np.testing.assert_allclose(run.result["eval"]["loss"], reference.result["eval"]["loss"],
                               rtol=1e-4, err_msg="eval loss (eval covers a different set of "
                               "examples when grad_accum_steps > 1?)")


def test_remat_matches_no_remat(reference, tmp_path):
    config = make_tiny_config(f"train.steps={STEPS}", *REFERENCE_MESH, "train.remat=true")
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
        _, opt = nnx.merge(t.graphdef, t.state.nnx)
        assert int(opt.step[...]) == 0, "no optimizer update may be applied"
        assert int(t.state.first_nonfinite) == 1
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
        _, opt = nnx.merge(t.graphdef, t.initial_state().nnx)
        assert int(opt.step[...]) == 2, "steps 1 and 3 update, step 2 does not"
        assert int(t.state.nonfinite) == 1
        assert int(t.state.first_nonfinite) == 2


def test_nan_stop_raises_with_step(tiny_config, tmp_path, monkeypatch):
    config = tiny_config("train.steps=3", "train.nan_policy=stop", "checkpoint.every=1")
    _poison_loss(monkeypatch, bad_ids=_ids_of_batch(config, 1))  # step 2's batch
    with Trainer(config, str(tmp_path), quiet=True) as t:
        with pytest.raises(FloatingPointError, match=r"step 2\b"):
            t.fit()
        assert t.step == 2, "training stops at the bad step"
        t.checkpoints.wait()
        assert t.checkpoints.all_steps() == [1], "the state after the bad step is not checkpointed"


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
