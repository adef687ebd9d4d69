"""Plain DETR (models/detr/model.py) end to end: the embedded shapes scenes through the COCO loader,
training (the loss decreases over 20 steps), COCO evaluation with boxes drawn for TensorBoard,
eval-only runs, the train augmentation switch, the in-graph matcher in a sharded jit, the
hybrid-matching query groups, the first prediction being the reference box, and clear config
errors."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, run_trainer

CONFIG = os.path.join(REPO_ROOT, "configs", "detr.py")
FAST = ("train.warmup_steps=0", "train.lr=1e-3", "train.log_every=1", "eval.batches=2",
        "checkpoint.every=0")


def smoke(tmp_path, *overrides):
    from trainer import load_config
    return load_config(f"{CONFIG}:smoke", [*FAST, f"data.embedded_dir={tmp_path / 'data'}",
                                           *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detr")
    config = smoke(tmp, "train.steps=20")
    return run_trainer(config, tmp / "run"), tmp


def test_loss_decreases_and_coco_metrics_are_reported(trained):
    run, _ = trained
    losses = [run.losses[s] for s in sorted(run.losses)]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    ev = run.result["eval"]
    assert {"AP", "AP50", "AP75", "loss", "loss_giou"} <= set(ev)
    assert 0.0 <= ev["AP50"] <= 1.0


def test_eval_only_run_reproduces_the_metrics_and_draws_boxes(trained):
    """train.steps=0 + init_from: COCO metrics of the trained run, no training step; the eval
    images (ground truth and detections drawn) are ready for TensorBoard."""
    from trainer import Trainer

    run, tmp = trained
    config = smoke(tmp, "train.steps=0", "mesh.data=2", "mesh.fsdp=4", f"init_from={run.workdir}")
    with Trainer(config, str(tmp / "eval_only"), quiet=True) as t:
        result = t.fit()
        images = t.last_eval_images
    assert result["step"] == 0
    assert result["eval"]["loss"] == pytest.approx(run.result["eval"]["loss"], rel=1e-5)
    for k in ("AP", "AP50"):  # another mesh: float noise may reorder near-equal scores
        assert result["eval"][k] == pytest.approx(run.result["eval"][k], abs=2e-3)
    tiles = images["detections"]
    assert tiles.dtype == np.uint8 and tiles.shape == (64, 4 * 64, 3)
    assert (np.all(tiles == (0, 255, 0), axis=-1)).any()  # ground-truth rectangles drawn


def test_in_graph_matcher_in_a_sharded_jit():
    """matcher=optax (TPU, multi-host): the Hungarian algorithm inside a jitted loss whose
    batch is split over 8 devices equals the host (scipy) matcher's loss."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from models.detr import loss as detr_loss

    k = jax.random.split(jax.random.key(2), 3)
    B, Q, M = 8, 10, 4
    outputs = {"logits": jax.random.normal(k[0], (B, Q, 2)),
               "boxes": jax.random.uniform(k[1], (B, Q, 4), minval=0.2, maxval=0.6)}
    targets = {"labels": jnp.zeros((B, M), jnp.int32),
               "boxes": jax.random.uniform(k[2], (B, M, 4), minval=0.2, maxval=0.6),
               "box_mask": jnp.arange(M)[None, :] < (jnp.arange(B) % M + 1)[:, None]}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    outputs, targets = jax.tree.map(shard, outputs), jax.tree.map(shard, targets)
    losses = {m: jax.jit(lambda o, t, m=m: detr_loss.set_loss(o, t, matcher=m, aux=False)[0])(
        outputs, targets) for m in ("optax", "scipy")}
    np.testing.assert_allclose(losses["optax"], losses["scipy"], rtol=1e-5)


def test_train_augmentation_flip_and_none_show_the_whole_image(tmp_path):
    """data.augment=none: the train examples are the eval examples (whole image, full canvas);
    flip: each is the eval example or its mirror image, and both occur."""
    from trainer.task import get_task

    examples = {}
    for augment in ("none", "flip"):
        task = get_task("detr")(smoke(tmp_path, f"data.augment={augment}"))
        train = task.train_data()
        examples[augment] = [train[i] for i in range(8)]
    from models.detr import coco
    p = task.paths()  # the train split's images as the eval transform shows them
    whole = coco.coco_detection(p["train_json"], p["train_images"], "eval", image_size=64,
                                max_objects=8)
    flipped = 0
    for plain, maybe in zip(examples["none"], examples["flip"]):
        ref = whole[int(plain["id"])]
        assert plain["pad_mask"].all() and maybe["pad_mask"].all()
        for k in ("image", "boxes", "labels", "box_mask", "scale"):
            np.testing.assert_array_equal(plain[k], ref[k])
        if not np.array_equal(maybe["image"], plain["image"]):
            flipped += 1
            np.testing.assert_array_equal(maybe["image"], plain["image"][:, ::-1])
            b = plain["boxes"][plain["box_mask"]]
            np.testing.assert_allclose(maybe["boxes"][maybe["box_mask"]],
                                       np.stack([1 - b[:, 0], *b[:, 1:].T], -1), atol=1e-6)
    assert 0 < flipped < 8


def model(**fields):
    from models.detr import PlainDETR
    from trainer import load_config

    cfg = load_config(f"{CONFIG}:smoke").model
    with cfg.unlocked():
        cfg.update(fields)
    return PlainDETR(cfg, rngs=nnx.Rngs(0))


IMAGES = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)


def forward(detr, images):
    return nnx.jit(lambda m, x: m(x))(detr, images)


def test_one_to_many_queries_do_not_change_the_one_to_one_predictions():
    detr = model(num_queries_one2many=6)
    out = forward(detr, IMAGES)
    assert out["logits"].shape[1] == 10 and out["one_to_many"]["boxes"].shape[1] == 6
    q = detr.query_content[...]
    noise = jax.random.normal(jax.random.key(1), q[10:].shape)
    detr.query_content[...] = q.at[10:].set(q[10:] + noise)  # only the one-to-many group
    moved = forward(detr, IMAGES)
    np.testing.assert_allclose(moved["logits"], out["logits"], atol=1e-6)
    np.testing.assert_allclose(moved["boxes"], out["boxes"], atol=1e-6)
    assert float(jnp.max(jnp.abs(moved["one_to_many"]["logits"] - out["one_to_many"]["logits"]))) > 1e-3


def test_first_layer_predicts_the_reference_boxes_at_init():
    """The box head's last layer starts at zero: b_1 = sigmoid(0 + sigmoid^-1(b_0)) = b_0."""
    detr = model()
    out = forward(detr, IMAGES)
    ref = jax.nn.sigmoid(detr.query_boxes[...])
    np.testing.assert_allclose(out["aux"][0]["boxes"], jnp.broadcast_to(ref, (2, 10, 4)), atol=1e-5)


def test_a_mechanisms_auxiliary_loss_reaches_the_detr_loss(tmp_path):
    """MoH in DETR's encoder: its load-balance loss, sown by the layers, is added to the DETR
    loss by the trainer's loss (trainer.task.loss_with_aux, the same for every family)."""
    from trainer.task import get_task, loss_with_aux

    config = smoke(tmp_path, "model.attention=moh", "model.moh_shared_heads=1",
                   "model.moh_top_k=2")
    task = get_task("detr")(config)
    detr = task.build_model(nnx.Rngs(0))
    data = task.eval_data()
    examples = [data[i] for i in range(2)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    plain, plain_metrics = task.loss(detr, batch)
    total, metrics = loss_with_aux(task, detr, batch)
    assert "aux_loss" not in plain_metrics and float(metrics["aux_loss"]) > 0
    np.testing.assert_allclose(total, plain + metrics["aux_loss"], rtol=1e-5)


@pytest.mark.parametrize("overrides,fragment", [
    (("model.num_classes=3",), "2 categories"),
    (("model.attention=routing",), "causal only"),
    (("model.stride=6",), "model.stride"),
    (("loss.matcher=greedy",), "allowed: 'scipy', 'optax'"),
    (("data.augment=crop",), "allowed: 'detr', 'flip', 'none'"),
])
def test_bad_configs_name_the_field(tmp_path, overrides, fragment):
    from trainer import ConfigError, Trainer

    with pytest.raises(ConfigError, match=fragment.replace("'", ".")):
        Trainer(smoke(tmp_path, *overrides), str(tmp_path / "run"), quiet=True)
