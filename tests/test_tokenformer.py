"""TokenFormer: Pattention against plain numpy, growth by zero parameter tokens preserving the
function (layer and whole LM), shrinking refused, the tiny config through the trainer, and
progressive growth through the trainer: init_from a smaller run (outputs unchanged, optimizer
state carried, other meshes) and the grow config's stages in one command."""
from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.pattention import GROWTH_PRESERVING, NORMS, Pattention, grow_pattention
from conftest import REPO_ROOT, run_trainer
from trainer.config import to_json

CONFIG = os.path.join(REPO_ROOT, "configs", "tokenformer.py")
_erf = np.vectorize(math.erf)


def np_gelu(a):
    return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))


def np_pattention(x, k, v, norm, zoom):
    """The paper's Theta(X K_P^T) V_P in float64 numpy (TokenFormer eq. 5 and its variants)."""
    x, k, v = (np.asarray(t, np.float64) for t in (x, k, v))
    a = x @ k.T
    if norm == "softmax":
        e = np.exp(a - a.max(-1, keepdims=True))
        w = zoom * e / e.sum(-1, keepdims=True)
    elif norm == "l2_norm_gelu":
        w = np_gelu(a / np.linalg.norm(a, axis=-1, keepdims=True) * zoom)
    else:
        g = np_gelu(a)
        w = g / np.linalg.norm(g, axis=-1, keepdims=True) * zoom
    return w @ v


def layer(n, norm, zoom=0.0, seed=0, d_in=12, d_out=10):
    # std 0.5: scores of order 1, so the normalisations are far from linear
    return Pattention(d_in, d_out, n, norm=norm, zoom=zoom, key_std=0.5, value_std=0.5,
                      rngs=nnx.Rngs(seed))


def params(p):
    return np.asarray(p.key_param_tokens[...]), np.asarray(p.value_param_tokens[...])


X = jax.random.normal(jax.random.key(7), (3, 5, 12))


def test_softmax_mode_equals_n_softmax():
    n = 16
    p = layer(n, "softmax")
    assert p.zoom == n  # the default zoom of softmax mode: n softmax(X K_P^T) V_P
    k, v = params(p)
    a = np.asarray(X, np.float64) @ k.T
    e = np.exp(a - a.max(-1, keepdims=True))
    want = n * (e / e.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(p(X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_pattention_equals_numpy_reference(norm):
    p = layer(16, norm)
    assert p.zoom == (16.0 if norm == "softmax" else 4.0)
    np.testing.assert_allclose(p(X), np_pattention(X, *params(p), norm, p.zoom),
                               rtol=1e-5, atol=1e-5)


def grown(p, new_n, seed=1, fresh_values=True):
    """A Pattention with new_n tokens and p's zoom holding p's parameters grown: zero new keys,
    and new values from its own initialisation (or zero)."""
    q = layer(new_n, p.norm, zoom=p.zoom, seed=seed)
    fresh = nnx.state(q, nnx.Param) if fresh_values else None
    nnx.update(q, grow_pattention(nnx.state(p, nnx.Param), new_n, fresh=fresh))
    return q


@pytest.mark.parametrize("factor", (1.5, 2.0))
@pytest.mark.parametrize("norm", GROWTH_PRESERVING)
def test_growth_with_zero_tokens_preserves_output(norm, factor):
    n = 16
    new_n = int(n * factor)
    p = layer(n, norm)
    q = grown(p, new_n)
    k, v = params(q)
    assert k.shape == (new_n, 12) and v.shape == (new_n, 10)
    np.testing.assert_array_equal(k[:n], params(p)[0])  # old tokens in the first rows
    np.testing.assert_array_equal(v[:n], params(p)[1])
    assert not k[n:].any() and v[n:].all()  # new keys start at zero, new values do not
    np.testing.assert_allclose(q(X), p(X), rtol=1e-6, atol=1e-6)
    # ... and the new tokens train: their keys get gradients (zero values would be a saddle)
    dk = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(q).key_param_tokens[...]
    assert float(jnp.min(jnp.abs(dk[n:]).sum(-1))) > 0
    saddle = grown(p, new_n, fresh_values=False)
    dk0 = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(saddle)
    assert not dk0.key_param_tokens[...][n:].any() and not dk0.value_param_tokens[...][n:].any()
    # the check can fail: a non-zero new token, or the zoom recomputed at the new size
    # (the reference's sqrt(n_current)), changes the function
    bumped = layer(new_n, norm, zoom=p.zoom)
    nnx.update(bumped, grow_pattention(nnx.state(p, nnx.Param), new_n))
    bumped.key_param_tokens[...] = bumped.key_param_tokens[...].at[n:].set(1.0)
    assert float(jnp.max(jnp.abs(bumped(X) - p(X)))) > 1e-3
    rezoomed = layer(new_n, norm)  # zoom = default at new_n
    nnx.update(rezoomed, nnx.state(q, nnx.Param))
    assert float(jnp.max(jnp.abs(rezoomed(X) - p(X)))) > 1e-3


@pytest.mark.parametrize("factor", (1.5, 2.0))
def test_softmax_growth_rescales_rows(factor):
    """softmax mode is not growth-preserving: each zero key adds exp(0) = 1 to the softmax
    denominator, so (with zero new values) O_new = O_old * S / (S + m), S = sum_j exp(A_j) over
    the old tokens."""
    n = 16
    m = int(n * factor) - n
    p = layer(n, "softmax")
    q = grown(p, n + m, fresh_values=False)
    k, _ = params(p)
    s = np.exp(np.asarray(X, np.float64) @ k.T).sum(-1, keepdims=True)
    np.testing.assert_allclose(q(X), np.asarray(p(X)) * s / (s + m), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(q(X) - p(X)))) > 1e-3


def test_shrinking_raises():
    p = layer(16, "l2_norm_gelu")
    with pytest.raises(ValueError, match=r"cannot shrink .*key_param_tokens.* from 16 to 8"):
        grow_pattention(nnx.state(p, nnx.Param), 8)


# ----------------------------------------------------------------------------- the LM
def tiny(*overrides):
    from trainer import load_config
    return load_config(f"{CONFIG}:tiny", list(overrides))


def lm_logits_and_loss(model, tokens):
    def fn(state, tokens):
        m = nnx.merge(graphdef, state)
        logits, _ = m(tokens[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
        return logits, nll.mean()
    graphdef, state = nnx.split(model)
    return jax.jit(fn)(state, tokens)


@pytest.mark.parametrize("norm", GROWTH_PRESERVING)
def test_grown_lm_equals_original(norm):
    from models.tokenformer import TokenFormer, grow_tokenformer

    # the config's zooms (set at the initial counts) stay fixed in the grown configs
    c = tiny(f"model.pattention_norm={norm}")
    small = TokenFormer(c.model, rngs=nnx.Rngs(0))
    # random (not zero-initialised) so every Pattention shapes the logits
    tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, 256, jnp.int32)
    logits, loss = lm_logits_and_loss(small, tokens)
    n, n_ffn = c.model.param_tokens, c.model.ffn_param_tokens
    for factor in (1.5, 2.0):
        new_n, new_ffn = int(n * factor), int(n_ffn * factor)
        big_cfg = tiny(f"model.pattention_norm={norm}", f"model.param_tokens={new_n}",
                       f"model.ffn_param_tokens={new_ffn}")
        assert big_cfg.model.pattention_zoom == c.model.pattention_zoom
        big = TokenFormer(big_cfg.model, rngs=nnx.Rngs(1))
        nnx.update(big, grow_tokenformer(nnx.state(small, nnx.Param), param_tokens=new_n,
                                         ffn_param_tokens=new_ffn,
                                         fresh=nnx.state(big, nnx.Param)))
        shapes = {jax.tree_util.keystr(p): x.shape for p, x in
                  jax.tree_util.tree_flatten_with_path(nnx.state(big, nnx.Param))[0]}
        for path, shape in shapes.items():  # every projection grew to its new count
            if "param_tokens" in path:
                assert shape[0] == (new_ffn if "'ffn'" in path else new_n), path
        big_logits, big_loss = lm_logits_and_loss(big, tokens)
        np.testing.assert_allclose(big_logits, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(big_loss, loss, rtol=1e-6)
    # the check can fail: the model built at the large size without the grown state differs
    other = TokenFormer(big_cfg.model, rngs=nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(lm_logits_and_loss(other, tokens)[0] - logits))) > 1e-3


def test_lm_shrinking_and_non_tokenformer_raise():
    from models.tokenformer import TokenFormer, grow_tokenformer

    c = tiny()
    state = nnx.state(TokenFormer(c.model, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"cannot shrink .*ffn.* from 128 to 64"):
        grow_tokenformer(state, param_tokens=64, ffn_param_tokens=64)
    with pytest.raises(ValueError, match="not a TokenFormer"):
        grow_tokenformer({"embed": np.zeros(3)}, param_tokens=64, ffn_param_tokens=128)


def test_task_registered_and_validates():
    from trainer import load_config
    from trainer.config import ConfigError
    from trainer.task import get_task

    task_cls = get_task("tokenformer")
    mesh = {"data": 8, "fsdp": 1, "tensor": 1}
    task_cls(tiny()).validate(mesh)
    with pytest.raises(ConfigError, match="pattention_norm"):
        task_cls(tiny("model.pattention_norm=relu")).check(mesh)
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(f"{CONFIG}:huge")


def test_tiny_config_trains(tmp_path):
    """Through the real trainer on a data x tensor mesh: the parameter tokens are split over
    the tensor axis (LOGICAL_RULES "param_tokens")."""
    config = tiny("train.steps=6", "train.warmup_steps=0", "train.log_every=1", "eval.every=0",
                  "eval.batches=2", "checkpoint.every=0", "sample.max_new_tokens=0",
                  "data.seq_len=32", "mesh.data=4", "mesh.tensor=2")
    run = run_trainer(config, tmp_path)
    losses = [run.losses[s] for s in sorted(run.losses)]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(math.log(256), rel=0.25)  # near uniform over bytes at init
    assert min(losses[-2:]) < losses[0]
    assert any("param_tokens" in k for k in run.params)


# ----------------------------------------------------------------------------- growth via init_from
def test_softmax_growth_warns_with_the_measured_losses(tmp_path, capsys):
    """Pattention with softmax normalisation is not growth-preserving (each zero key adds
    exp(0) to the softmax sum): growing it through init_from warns, with the losses measured on
    the same eval batch before and after, which differ."""
    from trainer import Trainer

    norm = ("model.pattention_norm=softmax", "model.pattention_zoom=1.0",
            "model.ffn_pattention_zoom=1.0")
    source = tiny(*GROW_OVERRIDES, *norm, "train.steps=1")
    with Trainer(source, str(tmp_path / "source"), quiet=True) as t:
        t.fit()
    grown = tiny(*GROW_OVERRIDES, *norm, "train.steps=1",
                 f"model.param_tokens={source.model.param_tokens * 2}",
                 f"init_from={tmp_path / 'source'}")
    capsys.readouterr()
    with Trainer(grown, str(tmp_path / "grown"), quiet=True) as t:
        t.initial_state()
        g = t.growth
    assert abs(g["loss_after"] - g["loss_before"]) > 1e-3
    assert (f"warning: init_from: the grown model does not compute the source's function: loss "
            f"on a fixed eval batch {g['loss_before']:.6f} before growth, {g['loss_after']:.6f} "
            f"after") in capsys.readouterr().err


GROW_OVERRIDES = ("train.warmup_steps=0", "train.log_every=1", "eval.every=0", "eval.batches=2",
                  "checkpoint.every=0", "sample.max_new_tokens=0", "data.seq_len=32")
SOURCE_STEPS = 3


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """The tiny TokenFormer trained SOURCE_STEPS steps on a data-parallel mesh: its workdir,
    its final model and its whole train state by name (parameters, Adam moments, counters)."""
    from trainer import Trainer
    from trainer.checkpoint import by_name

    workdir = tmp_path_factory.mktemp("tokenformer_source")
    config = tiny(*GROW_OVERRIDES, f"train.steps={SOURCE_STEPS}", "mesh.data=8")
    with Trainer(config, str(workdir), quiet=True) as t:
        t.fit()
        state = {k: np.asarray(jax.device_get(v)) for k, v in by_name(t.state).items()}
        return {"workdir": str(workdir), "model": t.model, "state": state,
                "num_params": t.num_params(), "config": config}


def grown_config(source, attn_factor, ffn_factor, *overrides):
    m = source["config"].model
    return tiny(*GROW_OVERRIDES, f"model.param_tokens={int(m.param_tokens * attn_factor)}",
                f"model.ffn_param_tokens={int(m.ffn_param_tokens * ffn_factor)}",
                f"init_from={source['workdir']}", *overrides)


@pytest.mark.parametrize("attn_factor,ffn_factor,carry,mesh", [
    (1.5, 2.0, "params+optimizer", ("mesh.data=8",)),
    (2.0, 1.5, "params+optimizer+step", ("mesh.data=2", "mesh.tensor=4")),
])
def test_growth_by_init_from_preserves_outputs_and_carries_optimizer_state(
        source_run, tmp_path, attn_factor, ffn_factor, carry, mesh, capsys):
    """Growing the q/k/v/o and FFN parameter tokens by 1.5x and 2x (each projection type at both
    factors over the two cases), on the same or another mesh: the grown model's logits and loss
    equal the source's; parameters and Adam moments keep the old rows exactly, with zero new
    rows; the step and the schedule's count continue (+step) or restart while Adam's
    bias-correction count carries."""
    from trainer import Trainer
    from trainer.checkpoint import by_name

    config = grown_config(source_run, attn_factor, ffn_factor, f"init_from_carry={carry}",
                          f"train.steps={SOURCE_STEPS + 2}", *mesh)
    with Trainer(config, str(tmp_path), quiet=True) as t:
        state = {k: np.asarray(jax.device_get(v)) for k, v in by_name(t.initial_state()).items()}
        growth, model, num_params = t.growth, t.model, t.num_params()
    assert "does not compute the source's function" not in capsys.readouterr().err
    tokens = jax.random.randint(jax.random.key(5), (2, 33), 0, 256, jnp.int32)
    logits, loss = lm_logits_and_loss(source_run["model"], tokens)
    big_logits, big_loss = lm_logits_and_loss(model, tokens)
    np.testing.assert_allclose(big_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(big_loss, loss, rtol=1e-6)
    assert growth["params_before"] == source_run["num_params"] < growth["params_after"] == num_params
    np.testing.assert_allclose(growth["loss_after"], growth["loss_before"], rtol=1e-6)

    src = source_run["state"]
    with_step = carry.endswith("step")
    adam_count = next(k for k in src if k.endswith("/0/count"))
    sched_count = next(k for k in src if k.startswith("nnx/1/opt_state") and k.endswith("count")
                       and k != adam_count)
    assert int(state["step"]) == int(state["nnx/1/step"]) == (SOURCE_STEPS if with_step else 0)
    assert int(state[sched_count]) == (SOURCE_STEPS if with_step else 0)
    assert int(state[adam_count]) == SOURCE_STEPS
    checked = set()
    for name, old in src.items():
        if not name.startswith(("nnx/0/", "nnx/1/opt_state")) or old.ndim < 2:
            continue
        new = state[name]
        n = old.shape[0]
        if name.endswith("param_tokens"):
            factor = ffn_factor if "/ffn/" in name else attn_factor
            assert new.shape == (int(n * factor), old.shape[1]), name
            if name.startswith("nnx/0/") and name.endswith("value_param_tokens"):
                assert new[n:].all(), f"{name}: new value tokens are initialised (they train)"
            else:
                assert not new[n:].any(), f"{name}: new keys and new moments start at zero"
            checked.add(("ffn" if "/ffn/" in name else name.split("/")[-2],
                         "moment" if "/opt_state/" in name else "param"))
        else:
            assert new.shape == old.shape, name
        np.testing.assert_array_equal(new[:n], old, err_msg=name)  # carried bit-exactly
        assert name.startswith("nnx/0/") or old.any(), f"{name}: the check needs non-zero moments"
    assert checked == {(p, kind) for p in ("q", "k", "v", "o", "ffn") for kind in ("param", "moment")}


def test_growth_then_resume_on_a_different_mesh(source_run, tmp_path):
    """Grow onto a data x tensor mesh, stop at a checkpoint, resume on a data x fsdp mesh: the
    losses equal an uninterrupted grown run's."""
    total = SOURCE_STEPS + 4
    cfg = lambda *mesh: grown_config(source_run, 2.0, 2.0,  # noqa: E731
                                     "init_from_carry=params+optimizer+step",
                                     f"train.steps={total}", *mesh)
    straight = run_trainer(cfg("mesh.data=2", "mesh.tensor=4"), tmp_path / "straight")
    first = run_trainer(cfg("mesh.data=2", "mesh.tensor=4"), tmp_path / "resumed",
                        max_steps=SOURCE_STEPS + 2)
    assert sorted(first.losses) == [SOURCE_STEPS + 1, SOURCE_STEPS + 2]
    second = run_trainer(cfg("mesh.data=4", "mesh.fsdp=2"), tmp_path / "resumed")
    assert sorted(second.losses) == [total - 1, total]
    # the new parameter tokens train: their keys left zero
    keys = {n: p for n, p in straight.params.items() if "['key_param_tokens']" in n}
    assert len(keys) == 10  # q, k, v, o and FFN of 2 blocks
    for name, p in keys.items():
        assert np.abs(p[p.shape[0] // 2:]).sum(-1).min() > 0, name
    for step in range(SOURCE_STEPS + 1, total + 1):
        got = (first.losses | second.losses)[step]
        assert got == pytest.approx(straight.losses[step], rel=1e-4), step
    # the data position carried over: the grown run's first batch is the source's next one
    from trainer.data import process_batches
    from trainer.task import get_task
    config = cfg("mesh.data=8")
    it = iter(process_batches(get_task("tokenformer")(config).train_data(),
                              config.train.global_batch_size, prefetch=0))
    batches = [next(it)["id"].tolist() for _ in range(SOURCE_STEPS + 1)]
    assert straight.ids[0].tolist() == batches[SOURCE_STEPS] != batches[0]


def test_growth_refuses_shrinking_other_models_and_changed_zoom(source_run, tmp_path):
    from trainer import Trainer
    from trainer.config import ConfigError
    from trainer.task import get_task

    task = get_task("tokenformer")
    src_json = json.loads(to_json(source_run["config"]))
    with pytest.raises(ConfigError, match=r"ffn_param_tokens=64 is smaller .* 128: cannot shrink"):
        task(tiny("model.ffn_param_tokens=64")).check_init_from(src_json)
    with pytest.raises(ConfigError, match=r"pattention_zoom.*set --config.model.pattention_zoom=8"):
        task(tiny("model.pattention_zoom=11.0")).check_init_from(src_json)
    with pytest.raises(ConfigError, match="'lm' run, not a TokenFormer"):
        task(tiny()).check_init_from(dict(src_json, task="lm"))
    # through the trainer: the error names the field, and the new workdir holds no checkpoint
    config = grown_config(source_run, 0.5, 1.0)
    with pytest.raises(ConfigError, match="cannot shrink"):
        with Trainer(config, str(tmp_path / "small"), quiet=True) as t:
            t.initial_state()
    assert not os.path.exists(tmp_path / "small" / "checkpoints" / "0")


def test_grow_config_trains_its_stages_in_one_command(tmp_path, capsys):
    """configs/tokenformer.py:grow: stage 1 trains, stage 2 grows from its checkpoint and goes
    on at the same step; each stage is checkpointed; a rerun skips finished stages."""
    from trainer.checkpoint import Checkpoints
    from trainer.main import main

    args = [f"--config={CONFIG}:grow", f"--workdir={tmp_path}", "--config.data.seq_len=32",
            "--config.train.global_batch_size=8", "--config.model.d_model=64",
            "--config.sample.max_new_tokens=0", "--config.eval.batches=1",
            "--config.train.schedule_steps=4",
            "--config.stages=({'train.steps': 2}, {'model.param_tokens': 64, "
            "'model.ffn_param_tokens': 256, 'train.steps': 4})"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stage 1/2" in out and "stage 2/2" in out
    before, after = re.search(r"growth: .*parameters [\d,]+ -> [\d,]+; loss on a fixed eval batch "
                              r"([\d.]+) before, ([\d.]+) after", out).groups()
    assert before == after
    for i, step in ((1, 2), (2, 4)):
        ck = Checkpoints(str(tmp_path / f"stage_{i}"))
        assert ck.latest_step() == step
        tokens = ck.restore_config(step)["model"]["param_tokens"]
        ck.close()
        assert tokens == (32 if i == 1 else 64)
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2
