"""The AST family (models/ast/model.py): PETL methods keep the frozen model's output at step 0 and
all learn after one step; position embeddings adapt in time; init_from + train.trainable
leave the frozen backbone bit-identical through the trainer."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import ast as ast_config
from models import ast
from trainer.config import ConfigError


def small_model_config(petl: str, **over):
    c = ast_config.get_config("tiny").model
    c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim = 2, 32, 4, 2, 64
    c.petl = petl
    for k, v in over.items():
        c[k] = v
    return c


def build(petl: str, seed: int = 0, **over):
    cfg = small_model_config(petl, **over)
    from models.vit import ImageClassifier
    rngs = nnx.Rngs(seed)
    return ImageClassifier(ast.AST(cfg, 40, 32, rngs=rngs), cfg, dtype=jnp.float32, rngs=rngs)


def names(state):
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def load_frozen(model, frozen):
    """Copies the frozen model's parameters into `model` by name (PETL models draw their
    random numbers in another order, so the same seed is not enough)."""
    src = names(nnx.state(frozen, nnx.Param))
    dst = nnx.state(model, nnx.Param)
    for name, v in names(dst).items():
        if name in src:
            v.set_value(src[name].get_value())
    nnx.update(model, dst)
    return set(src)


METHODS = [("full", {}), ("linear", {}), ("bitfit", {}),
           ("adapter", dict(adapter_placement="parallel", adapter_location="both")),
           ("adapter", dict(adapter_placement="sequential", adapter_location="both")),
           ("conformer", dict(adapter_placement="parallel", adapter_location="both")),
           ("lora", {}), ("prompt", {})]


@pytest.mark.parametrize("petl,over", METHODS, ids=lambda x: x if isinstance(x, str) else
                         "-".join(map(str, x.values())))
def test_petl_starts_at_the_frozen_model_and_every_trainable_leaf_learns(petl, over):
    frozen = build("full", seed=0)
    model = build(petl, seed=1, **over)
    frozen_names = load_frozen(model, frozen)
    x = jax.random.normal(jax.random.key(0), (3, 40, 32))
    y = jax.random.randint(jax.random.key(1), (3,), 0, 8)
    # step 0: exactly the frozen backbone's output
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m: m(x))(model)),
                                  np.asarray(nnx.jit(lambda m: m(x))(frozen)))

    regex = re.compile(ast.PETL_TRAINABLE[petl])
    wrt = nnx.All(nnx.Param, lambda path, _: bool(regex.search("/".join(map(str, path)))))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    before = {k: np.asarray(v.get_value()) for k, v in names(nnx.state(model, nnx.Param)).items()}

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    grad_fn = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt)))
    opt.update(model, grad_fn(model))
    grads = names(grad_fn(model))  # after one step
    trained = set(grads)
    assert trained, "the method trains nothing"
    new = set(names(nnx.state(model, nnx.Param))) - frozen_names
    assert new <= trained, f"new parameters that do not train: {new - trained}"
    for name, g in grads.items():
        assert np.abs(np.asarray(g.get_value())).max() > 0, f"{petl}: {name} has a zero gradient"
    after = names(nnx.state(model, nnx.Param))
    for name, v in after.items():
        if name not in trained:
            np.testing.assert_array_equal(np.asarray(v.get_value()), before[name], err_msg=name)
    if petl != "full":
        assert len(trained) < len(after)


def test_bitfit_trains_biases_and_the_classifier_only():
    model = build("bitfit")
    regex = re.compile(ast.PETL_TRAINABLE["bitfit"])
    picked = [n for n in names(nnx.state(model, nnx.Param)) if regex.search(n)]
    assert picked and all(n.endswith("bias") or n.startswith("classifier") for n in picked)


def test_position_embeddings_adapt_in_time():
    f, d = 3, 5
    src = jax.random.normal(jax.random.key(0), (2 + f * 7, d))
    np.testing.assert_array_equal(np.asarray(ast.adapt_pos_embed(src, f, 7)), np.asarray(src))
    grid = np.asarray(src[2:]).reshape(f, 7, d)
    cut = np.asarray(ast.adapt_pos_embed(src, f, 3))
    np.testing.assert_array_equal(cut[:2], np.asarray(src[:2]))  # CLS and distillation kept
    np.testing.assert_array_equal(cut[2:].reshape(f, 3, d), grid[:, 2:5])  # the centre
    # longer: linear interpolation keeps what is constant in time, and the ends' range
    const = np.concatenate([np.zeros((2, d)), np.repeat(np.arange(f * d, dtype=np.float32)
                                                        .reshape(f, 1, d), 7, 1).reshape(-1, d)])
    long = np.asarray(ast.adapt_pos_embed(const, f, 12))
    np.testing.assert_allclose(long[2:].reshape(f, 12, d), np.repeat(const[2:].reshape(
        f, 7, d)[:, :1], 12, 1), rtol=1e-6)
    ramp = np.asarray(ast.adapt_pos_embed(np.concatenate(
        [np.zeros((2, 1)), np.tile(np.arange(7.0), f)[:, None]]), f, 14))[2:].reshape(f, 14)
    assert np.all(np.diff(ramp, axis=1) >= 0) and ramp.min() >= 0 and ramp.max() <= 6
    with pytest.raises(ConfigError, match="grid"):
        ast.adapt_pos_embed(np.zeros((2 + 10, d)), 3, 4)


def test_config_errors_name_the_field():
    from trainer.trainer import Trainer

    def check(match, **fields):
        c = ast_config.get_config("tiny")
        for k, v in fields.items():
            node = c
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
        task = __import__("trainer.task", fromlist=["get_task"]).get_task("ast")(c)
        with pytest.raises(ConfigError, match=match):
            task.check({"data": 1, "fsdp": 1, "tensor": 1})
    check("petl='nope'", **{"model.petl": "nope"})
    check("train.trainable is empty", **{"model.petl": "lora"})
    check("conformer_kernel=4", **{"model.conformer_kernel": 4})
    check("adapter_location='attn'", **{"model.adapter_location": "attn"})
    check("pool='cls'", **{"model.pool": "cls"})
    assert Trainer  # imported: the trainer is what runs these configs


@pytest.mark.slow
def test_petl_through_the_trainer(tmp_path, capsys):
    """Pretrain a few steps, then adapt with init_from (another target length: the position
    embeddings are adapted) for one step: frozen parameters bit-identical to the source,
    the classifier fresh, the trainable share reported, spectrogram pictures drawn."""
    from trainer.checkpoint import Checkpoints
    from trainer.trainer import Trainer

    def config(variant, **over):
        c = ast_config.get_config(variant)
        c.data.synthetic_per_fold = 4
        c.data.embedded_dir = str(tmp_path / "data")
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
        c.train.global_batch_size = 8
        c.eval.batches = 2
        c.train.log_every = 1
        c.checkpoint.every = c.eval.every = 1000
        for k, v in over.items():
            node = c
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
        return c

    src_dir = str(tmp_path / "pretrain")
    Trainer(config("pretrain", **{"train.steps": 2}), src_dir, quiet=True).fit()
    c = config("lora", **{"train.steps": 1, "init_from": src_dir, "data.target_length": 60})
    t = Trainer(c, str(tmp_path / "lora"))
    assert 0 < t.trainable_share() < 0.05
    capsys.readouterr()
    t.fit()
    # another target length resizes the position embeddings: said so, and no "growth" loss
    # comparison (the two models see different spectrograms)
    said = capsys.readouterr()
    log = said.out + said.err
    assert "init_from: position embeddings resized to this run's data.target_length: 1 arrays " \
           "adapted (backbone/pos_embed)" in log
    assert "growth" not in log and t.growth == {}

    src = Checkpoints(src_dir)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    src_flat = src.restore_flat(src.latest_step(), lambda name, shape: one)
    src.close()
    adapted = names(nnx.state(t.model, nnx.Param))
    for name, v in adapted.items():
        value = np.asarray(v.get_value())
        key = "nnx/0/" + name
        if "lora_" in name:
            continue
        if name.startswith("classifier"):
            assert not np.array_equal(value, np.asarray(src_flat[key]))  # fresh, then trained
        elif name.endswith("pos_embed"):
            f, time = ast.patch_grid(60, 128, c.model)
            np.testing.assert_array_equal(value, np.asarray(
                ast.adapt_pos_embed(src_flat[key], f, time)))
        else:
            np.testing.assert_array_equal(value, np.asarray(src_flat[key]), err_msg=name)
    outputs = {"id": np.arange(3), "label": np.array([0, 1, 2]), "predicted": np.array([0, 1, 1])}
    pictures = t.task.eval_images(outputs)
    assert pictures["spectrograms"].dtype == np.uint8 and pictures["spectrograms"].ndim == 3
    assert t.task.eval_captions[2] == "pink_burst -> white_burst"
