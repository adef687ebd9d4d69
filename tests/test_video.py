"""The video family (models/video.py): the moving-shapes generator moves its shape by the class's
motion and its mirror classes are the same frames reversed; VideoViT with STDHA and no shift is
the image ViT frame by frame (the classifier averages the frames), and only with a shift does
the order of the frames matter; clip folders (root/<class>/<clip>/<frame>) load in natural
frame order with TSN sampling, bad layouts are named; through the trainer a clip folder trains
from an image ViT run's parameters (init_from), and bad fields are config errors."""
from __future__ import annotations

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import REPO_ROOT, jit_apply, param_arrays, run_trainer
from models import video
from models.vit import ImageClassifier, ViT
from trainer import Trainer, load_config
from trainer.config import ConfigError
from trainer.task import get_task

VIDEO = os.path.join(REPO_ROOT, "configs", "video.py")
VIT = os.path.join(REPO_ROOT, "configs", "vit.py")
RUN = ("train.warmup_steps=0", "train.log_every=1", "eval.every=0", "eval.batches=1",
       "checkpoint.every=0", "checkpoint.async_save=false", "data.num_eval=16",
       "train.global_batch_size=8")


@pytest.fixture(autouse=True)
def _logical_axes_without_mesh():
    with nnx.use_eager_sharding(False):
        yield


# ----------------------------------------------------------------------------- moving shapes
def _centroids(clip):
    """The centre of the shape's pixels per frame (noise=0: the background is one colour, the
    most common one), as (x, y) [F, 2]."""
    out = []
    for frame in clip.astype(np.int32):
        flat = frame.reshape(-1, 3)
        colours, counts = np.unique(flat, axis=0, return_counts=True)
        mask = np.any(frame != colours[np.argmax(counts)], axis=-1)
        ys, xs = np.nonzero(mask)
        out.append((xs.mean() + 0.5, ys.mean() + 0.5))
    return np.array(out)


@pytest.mark.parametrize("motion", video.MOTION_CLASSES)
def test_shapes_move_by_their_class(motion):
    """With noise 0 the shape's centroid moves by (dx, dy) x speed x S every frame (within a
    pixel of rasterisation); a spinning shape stays put while its pixels change."""
    S, F, speed = 32, 5, 0.05
    dx, dy, spin = video.MOTIONS[motion]
    for seed in range(3):
        clip = video.draw_motion_clip(np.random.default_rng(seed), S, F, motion, noise=0.0,
                                      speed=speed)
        assert clip.shape == (F, S, S, 3) and clip.dtype == np.uint8
        step = np.diff(_centroids(clip), axis=0)  # [F - 1, 2]
        np.testing.assert_allclose(step.mean(0), [dx * speed * S, dy * speed * S], atol=0.6)
        if spin:
            assert all(not np.array_equal(a, b) for a, b in zip(clip[:-1], clip[1:]))


def test_mirror_classes_are_the_same_frames_reversed():
    """Each class's mirror (MOTIONS lists them in pairs) draws the same frames in reverse order
    from the same generator state: no model blind to frame order can tell them apart."""
    names = video.MOTION_CLASSES
    for a, b in zip(names[::2], names[1::2]):
        for seed in range(2):
            ca = video.draw_motion_clip(np.random.default_rng(seed), 24, 4, a, noise=0.0)
            cb = video.draw_motion_clip(np.random.default_rng(seed), 24, 4, b, noise=0.0)
            np.testing.assert_array_equal(ca, cb[::-1], err_msg=f"{a} / {b}")
            assert not np.array_equal(ca, cb)


def test_motion_clips_are_deterministic_and_labelled():
    src = video.MotionClips(16, 24, 4, seed=3)
    a, b = src[5], video.MotionClips(16, 24, 4, seed=3)[5]
    np.testing.assert_array_equal(a["video"], b["video"])
    assert a["video"].shape == (4, 24, 24, 3) and a["video"].dtype == np.float32
    assert -1 <= a["video"].min() and a["video"].max() <= 1
    assert {int(src[i]["label"]) for i in range(16)} <= set(range(len(video.MOTION_CLASSES)))
    assert not np.array_equal(src[5]["video"], video.MotionClips(16, 24, 4, seed=4)[5]["video"])


def test_a_path_that_leaves_the_image_is_refused():
    with pytest.raises(ConfigError, match=r"data.num_frames=12.*data.speed=0.05"):
        video.MotionClips(4, 24, 12, seed=0, speed=0.05)
    with pytest.raises(ConfigError, match="not one of"):
        video.draw_motion_clip(np.random.default_rng(0), 24, 4, "sideways")


# ----------------------------------------------------------------------------- model
def _model_cfg(**kw):
    c = load_config(f"{VIDEO}:tiny", ["model.num_layers=2", "model.d_model=32",
                                      "data.image_size=16", "data.num_frames=4",
                                      *[f"model.{k}={v}" for k, v in kw.items()]])
    return c


def _models(shift):
    """(video classifier, image classifier) with the same parameters; the video one with STDHA
    (stdha_shift = shift), the image one with softmax attention."""
    c = _model_cfg()
    c.model.stdha_shift = shift
    m = c.model
    vid = ImageClassifier(video.VideoViT(m, 16, 4, rngs=nnx.Rngs(0)), m, dtype=jnp.float32,
                          rngs=nnx.Rngs(0))
    m_img = m.copy_and_resolve_references()
    m_img.attention = "softmax"
    img = ImageClassifier(ViT(m_img, 16, rngs=nnx.Rngs(1)), m_img, dtype=jnp.float32,
                          rngs=nnx.Rngs(1))
    # a non-zero classifier, so the logits depend on the features
    nnx.update(vid, {"classifier": {"kernel": nnx.Param(
        jnp.asarray(np.random.default_rng(0).standard_normal((32, 8)), jnp.float32))}})
    nnx.update(img, nnx.state(vid, nnx.Param))  # the image checkpoint loads unchanged
    return vid, img


def _clips(B=2, F=4):
    return jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (B, F, 16, 16, 3)), jnp.float32)


def test_no_shift_is_the_image_vit_frame_by_frame():
    """STDHA without shifts: the video backbone's tokens are the image ViT's on each frame, and
    its logits the mean of the image classifier's logits over the frames (frame averaging)."""
    vid, img = _models(())
    x = _clips()
    B, F = x.shape[:2]
    tokens, pooled = jit_apply(vid, lambda m, x: m.backbone(x), x)
    img_tokens, img_pooled = jit_apply(img, lambda m, x: m.backbone(x), x.reshape(B * F, 16, 16, 3))
    np.testing.assert_allclose(tokens, img_tokens.reshape(B, -1, img_tokens.shape[-1]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, img_pooled.reshape(B, F, -1).mean(1), rtol=1e-5, atol=1e-5)
    logits = jit_apply(vid, lambda m, x: m(x), x)
    img_logits = jit_apply(img, lambda m, x: m(x), x.reshape(B * F, 16, 16, 3))
    np.testing.assert_allclose(logits, img_logits.reshape(B, F, -1).mean(1), rtol=1e-4, atol=1e-5)


def test_frame_order_matters_only_with_a_shift():
    """Reversing (or rolling) a clip's frames changes the logits with STDHA's shifts and leaves
    them unchanged without (frame averaging is blind to order)."""
    x = _clips()
    for shift, changes in ((("1:-1", "2:1"), True), ((), False)):
        vid, _ = _models(shift)
        base = np.asarray(jit_apply(vid, lambda m, x: m(x), x))
        for perm in (x[:, ::-1], jnp.roll(x, 1, axis=1)):
            got = np.asarray(jit_apply(vid, lambda m, x: m(x), perm))
            if changes:
                assert np.abs(got - base).max() > 1e-3 * np.abs(base).max(), shift
            else:
                np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-5)


def test_clips_of_a_batch_stay_apart():
    """STDHA shifts keys / values within each clip only: changing clip 1 leaves clip 0's
    logits as they were (a layout mismatch between VideoViT's [B * F] frames and the shift
    would mix clips), and changes clip 1's."""
    vid, _ = _models(("1:-1", "2:1"))
    x = _clips(B=3)
    y = x.at[1].set(-x[1])
    a = np.asarray(jit_apply(vid, lambda m, x: m(x), x))
    b = np.asarray(jit_apply(vid, lambda m, x: m(x), y))
    np.testing.assert_allclose(b[[0, 2]], a[[0, 2]], rtol=1e-5, atol=1e-6)
    assert np.abs(b[1] - a[1]).max() > 1e-3


# ----------------------------------------------------------------------------- clip folders
def test_frame_indices_are_tsn_segments():
    np.testing.assert_array_equal(video.frame_indices(12, 6), [1, 3, 5, 7, 9, 11])
    np.testing.assert_array_equal(video.frame_indices(3, 6), [0, 0, 1, 1, 2, 2])
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = video.frame_indices(20, 4, rng)
        assert all(5 * k <= i < 5 * (k + 1) for k, i in enumerate(idx)), idx
    assert len({tuple(video.frame_indices(20, 4, rng)) for _ in range(10)}) > 1


def _write(root, **kw):
    """A root/train + root/val clip folder: 1 clip per class each, 12 frames of 24 px."""
    for split, seed in (("train", 0), ("val", 1)):
        video.write_clip_folder(os.path.join(root, split), num_per_class=1, image_size=24,
                                num_frames=12, seed=seed, speed=0.02, **kw)
    return root


def test_clip_folder_reads_frames_in_natural_order(tmp_path):
    """Frames named frame_1 .. frame_12 (unpadded), each one flat grey level k: eval reads the
    middle of each of 6 segments, frames 2, 4, .., 12 in that order (frame_10 after frame_9)."""
    clip = tmp_path / "clips" / "a" / "clip0"
    clip.mkdir(parents=True)
    for k in range(1, 13):
        Image.fromarray(np.full((8, 10, 3), 20 * k, np.uint8)).save(clip / f"frame_{k}.png")
    (tmp_path / "clips" / "b" / "clip0").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "clips" / "b" / "clip0" / "1.png")
    ds, names = video.clip_folder(str(tmp_path / "clips"), "train", image_size=4, num_frames=6,
                                  eval_fraction=0.01)
    assert names == ["a", "b"]
    ev = video._ClipEval(6, 4).map({"path": str(clip), "label": 0, "id": 0})["video"]
    np.testing.assert_allclose(ev.mean(axis=(1, 2, 3)), [20 * k / 127.5 - 1 for k in
                                                          (2, 4, 6, 8, 10, 12)], atol=1e-2)
    # train: one frame from each segment, in order, whatever the crop
    for i in range(4):
        levels = (ds[i]["video"].mean(axis=(1, 2, 3)) + 1) * 127.5 / 20
        if int(ds[i]["label"]) == 0:
            got = np.round(levels).astype(int)
            assert all(2 * s + 1 <= k <= 2 * s + 2 for s, k in enumerate(got)), got


def test_clip_folder_reads_the_written_clips(tmp_path):
    """write_clip_folder -> clip_folder: every eval clip is labelled by its class folder and
    matches the generator's frames (JPEG error aside) better than its mirror class's (the same
    frames reversed); train clips come out [F, S, S, 3]."""
    root = _write(str(tmp_path / "clips"))
    ds, names = video.clip_folder(root, "eval", image_size=24, num_frames=6)
    assert names == sorted(video.MOTION_CLASSES) and len(ds) == len(names)
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["video"].shape == (6, 24, 24, 3)
        motion = names[int(ex["label"])]
        c = video.MOTION_CLASSES.index(motion)
        want = video.draw_motion_clip(np.random.default_rng((3, 1, c, 0)), 24, 12, motion,
                                      speed=0.02).astype(np.float32) / 127.5 - 1
        err = np.abs(ex["video"] - want[1::2]).mean()
        assert err < 0.12 and err < np.abs(ex["video"] - want[::-1][1::2]).mean(), motion
    train, _ = video.clip_folder(root, "train", image_size=16, num_frames=6, seed=0)
    assert train[0]["video"].shape == (6, 16, 16, 3) and train[0]["video"].dtype == np.float32


def test_bad_clip_folders_are_named(tmp_path):
    from models.images import write_image_folder
    flat = write_image_folder(str(tmp_path / "images"), num_per_class=1, image_size=16)
    with pytest.raises(ConfigError, match="holds images directly.*<root>/<class>/<clip>/"):
        video.list_clip_folder(flat, "train")
    root = _write(str(tmp_path / "clips"))
    empty = os.path.join(root, "train", "up", "up_empty")
    os.makedirs(empty)
    with pytest.raises(ConfigError, match=r"(?s)1 of the 9 clips.*up_empty: ValueError: no frames"):
        video.clip_folder(root, "train", image_size=16, num_frames=4)
    with pytest.warns(UserWarning, match="up_empty"):
        ds, _ = video.clip_folder(root, "train", image_size=16, num_frames=4, skip_bad=True)
    os.rmdir(empty)
    shutil.rmtree(os.path.join(root, "train", "down"))
    os.makedirs(os.path.join(root, "train", "down"))
    with pytest.raises(ConfigError, match="class folder .*down' has no clips"):
        video.list_clip_folder(root, "train")


# ----------------------------------------------------------------------------- through the trainer
def test_an_image_vit_run_trains_on_a_clip_folder(tmp_path):
    """A ViT run on images (configs/vit.py), then configs/video.py:from_vit on a clip folder
    with init_from it: the backbone's shapes and image size come from the image run
    (init_from_config), its parameters load unchanged (the same names and shapes, zero new
    ones), the classifier is new, and training changes them."""
    src = run_trainer(load_config(f"{VIT}:tiny", ["train.steps=1", "model.num_layers=1",
                                                  "data.image_size=16", *RUN]), tmp_path / "img")
    root = _write(str(tmp_path / "clips"))
    for split in ("train", "val"):  # 3 classes: another label set than the source's 8
        for motion in sorted(os.listdir(os.path.join(root, split)))[3:]:
            shutil.rmtree(os.path.join(root, split, motion))
    c = load_config(f"{VIDEO}:from_vit", ["train.steps=2", *RUN, "data.num_frames=4",
                                          f"data.paths={root}", f"init_from={tmp_path / 'img'}",
                                          "model.num_classes=3", "train.global_batch_size=2"])
    assert (c.model.num_layers, c.model.patch_size, c.data.image_size) == (1, 4, 16)
    assert c.model.attention == "stdha" and c.init_from_skip == "^classifier"
    with Trainer(c, str(tmp_path / "video"), quiet=True, devices=jax.devices()[:1]) as t:
        before = param_arrays(t.model)
        result = t.fit()
        after = param_arrays(t.model)
    assert before.keys() == src.params.keys()
    for k, v in src.params.items():
        if k.startswith("['backbone']"):
            np.testing.assert_array_equal(before[k], v, err_msg=k)
            assert not np.array_equal(after[k], v), k
    # the classifier is new (zeros, 3 classes), not the image run's (8 classes, trained)
    kernel = next(k for k in src.params if k.startswith("['classifier']") and "kernel" in k)
    assert src.params[kernel].shape[-1] == 8 and np.abs(src.params[kernel]).max() > 0
    assert before[kernel].shape[-1] == 3 and not before[kernel].any()
    assert math.isfinite(result["eval"]["loss"]) and t.task.throughput_unit == "clips"
    # a run of a family the video family cannot start from is refused by name
    with pytest.raises(ConfigError, match="'video', which starts from 'video' or 'vit' runs"):
        load_config(f"{VIDEO}:from_vit", [f"init_from={_fake_run(tmp_path, 'lm')}"])


def _fake_run(tmp_path, task):
    """A run directory whose saved config says `task` (what init_from_config reads)."""
    d = tmp_path / f"{task}_run" / "checkpoints" / "1" / "config"
    d.mkdir(parents=True)
    (d / "metadata").write_text(json.dumps({"task": task, "model": {}}))
    return str(tmp_path / f"{task}_run")


def _error(*overrides, tmp_path):
    with pytest.raises(ConfigError) as e:
        Trainer(load_config(f"{VIDEO}:tiny", list(overrides)), str(tmp_path), quiet=True)
    return str(e.value)


def test_bad_video_fields_are_config_errors(tmp_path):
    assert "data.num_frames=20" in _error("data.num_frames=20", tmp_path=tmp_path)
    msg = _error("model.num_classes=5", tmp_path=tmp_path)
    assert "moving shapes" in msg and "8 classes" in msg
    assert "stdha_shift" in _error("model.stdha_shift=('9:1',)", tmp_path=tmp_path)
    assert get_task("video").throughput_unit == "clips"


def test_every_variant_builds(tmp_path):
    """frame_avg (softmax: no STDHA fields, not even stdha_shift) and tiny pass the checks and
    build;
    from_vit needs its source run (test_an_image_vit_run_trains_on_a_clip_folder)."""
    for variant, attention in (("tiny", "stdha"), ("frame_avg", "softmax")):
        c = load_config(f"{VIDEO}:{variant}", ["model.num_layers=1"])
        with Trainer(c, str(tmp_path / variant), quiet=True) as t:
            assert c.model.attention == attention and t.num_params() > 0
            assert ("stdha_shift" in c.model) == (attention == "stdha")
