"""models/images.py: the shapes generator (scenes, sequences), its datasets, and ImageFolder."""
from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from models import images
from trainer.config import ConfigError

S = 32


def _background_colour(img: np.ndarray) -> np.ndarray:
    # a shape lies in a disc of radius r centred >= r from the borders: it never covers a corner
    return img[0, 0]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> the uint8 pixels it was made from."""
    return np.rint((image + 1) * 127.5).astype(np.uint8)


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ----------------------------------------------------------------------------- generator
def test_scene_is_deterministic_per_seed():
    a = images.draw_scene(np.random.default_rng(7), S, max_shapes=3)
    b = images.draw_scene(np.random.default_rng(7), S, max_shapes=3)
    c = images.draw_scene(np.random.default_rng(8), S, max_shapes=3)
    for k in ("image", "boxes", "classes", "areas"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("size", [16, 32, 64])
def test_single_shape_box_is_tight_box_of_changed_pixels(size):
    for c, kind in enumerate(images.SHAPE_KINDS):
        for seed in range(4):
            s = images.draw_scene(np.random.default_rng((seed, c)), size, noise=0.0, kinds=(kind,))
            img = s["image"]
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            changed = np.any(img != _background_colour(img), axis=-1)
            assert s["boxes"].dtype == np.float32 and s["boxes"].shape == (1, 4)
            np.testing.assert_array_equal(s["boxes"][0], _tight_box(changed))
            assert s["areas"][0] == changed.sum()
            assert s["classes"].dtype == np.int32 and s["classes"].tolist() == [c]


def test_multi_shape_boxes_and_areas_match_each_shapes_visible_pixels():
    # without noise every shape is one flat colour, distinct from the background and from the
    # other shapes: each colour region must be exactly one (box, area) pair
    sizes = []
    for seed in range(30):
        s = images.draw_scene(np.random.default_rng(seed), 48, min_shapes=2, max_shapes=4,
                              noise=0.0)
        img = s["image"]
        bg = _background_colour(img)
        regions = []
        for colour in np.unique(img.reshape(-1, 3), axis=0):
            if (colour == bg).all():
                continue
            mask = np.all(img == colour, axis=-1)
            regions.append((*_tight_box(mask), float(mask.sum())))
        listed = [(*map(float, b), float(a)) for b, a in zip(s["boxes"], s["areas"])]
        assert sorted(regions) == sorted(listed)
        assert ((0 <= s["classes"]) & (s["classes"] < images.NUM_SHAPE_CLASSES)).all()
        sizes.append(len(listed))
    assert min(sizes) >= 2 and max(sizes) == 4


def test_noisy_scene_boxes_lie_inside_the_image():
    for seed in range(20):
        s = images.draw_scene(np.random.default_rng(seed), S, max_shapes=5, noise=0.2)
        b = s["boxes"]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= S).all() and (b[:, 2:] > b[:, :2]).all()
        # a shape's visible pixels fit in its box
        assert (s["areas"] <= (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).all()


def test_sequence_target_moves_and_stays_in_the_image():
    seq = images.draw_sequence(np.random.default_rng(3), S, 16, num_distractors=2)
    assert seq["frames"].shape == (16, S, S, 3) and seq["frames"].dtype == np.uint8
    assert seq["boxes"].shape == (16, 4) and seq["boxes"].dtype == np.float32
    assert seq["visible"].shape == (16,) and seq["visible"].dtype == bool
    b = seq["boxes"]
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= S).all() and (b[:, 2:] > b[:, :2]).all()
    centres = (b[:, :2] + b[:, 2:]) / 2
    assert len({tuple(x) for x in b.tolist()}) > 8  # the box changes from frame to frame
    assert np.abs(np.diff(centres, axis=0)).sum() > 8
    again = images.draw_sequence(np.random.default_rng(3), S, 16, num_distractors=2)
    np.testing.assert_array_equal(seq["frames"], again["frames"])
    np.testing.assert_array_equal(seq["boxes"], again["boxes"])


def test_sequence_box_is_tight_box_of_the_target():
    seq = images.draw_sequence(np.random.default_rng(0), S, 12, num_distractors=0, noise=0.0)
    for frame, box in zip(seq["frames"], seq["boxes"]):
        changed = np.any(frame != _background_colour(seq["frames"][0]), axis=-1)
        np.testing.assert_array_equal(box, _tight_box(changed))
    assert seq["visible"].all()


# ----------------------------------------------------------------------------- shapes datasets
def test_classification_examples_have_the_documented_form():
    ds = images.ShapesClassification(4, S, seed=0)
    x = ds[2]
    assert x["image"].shape == (S, S, 3) and x["image"].dtype == np.float32
    assert -1 <= x["image"].min() < x["image"].max() <= 1
    assert x["label"].dtype == np.int32 and x["label"].shape == ()
    assert x["id"].dtype == np.int32 and int(x["id"]) == 2


def test_classification_labels_cover_all_classes():
    ds = images.ShapesClassification(300, S, seed=1)
    labels = np.array([x["label"] for x in ds._getitems(range(len(ds)))])
    assert set(labels.tolist()) == set(range(images.NUM_SHAPE_CLASSES))


def test_label_is_the_largest_shape():
    ds = images.ShapesClassification(30, S, seed=5, max_shapes=3)
    for i in range(30):
        scene = images.draw_scene(np.random.default_rng((0, 5, i)), S, max_shapes=3)
        assert int(ds[i]["label"]) == scene["classes"][np.argmax(scene["areas"])]
        np.testing.assert_array_equal(_to_uint8(ds[i]["image"]), scene["image"])


def test_reading_order_does_not_change_an_example():
    ds = images.ShapesClassification(20, S, seed=3)
    forward = ds._getitems(range(20))
    backward = images.ShapesClassification(20, S, seed=3)._getitems(range(19, -1, -1))[::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"] == b["label"] and a["id"] == b["id"]


def test_train_and_eval_splits_are_disjoint():
    kw = dict(image_size=S, num_train=64, num_eval=32, seed=0)
    train = images.shapes_classification("train", **kw)
    evals = images.shapes_classification("eval", **kw)
    first_epoch = [train[i] for i in range(64)]
    assert sorted(int(x["id"]) for x in first_epoch) == list(range(64))  # a permutation
    assert len(evals) == 32
    train_images = {x["image"].tobytes() for x in first_epoch}
    assert not train_images & {x["image"].tobytes() for x in evals}
    # train repeats forever; eval is deterministic
    assert int(train[64 * 5 + 3]["id"]) in range(64)
    again = images.shapes_classification("eval", **kw)
    np.testing.assert_array_equal(evals[7]["image"], again[7]["image"])
    with pytest.raises(ValueError, match="split"):
        images.shapes_classification("test", **kw)


# ----------------------------------------------------------------------------- ImageFolder
def _read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_written_folder_round_trips(tmp_path):
    root = images.write_image_folder(str(tmp_path), num_per_class=6, image_size=24)
    train_files, _, names = images.list_image_folder(root, "train", eval_fraction=0.3)
    eval_files, _, _ = images.list_image_folder(root, "eval", eval_fraction=0.3)
    assert names == sorted(images.SHAPE_KINDS)
    assert not set(train_files) & set(eval_files) and len(train_files) + len(eval_files) == 48
    ds, names = images.image_folder(root, "eval", image_size=24, eval_fraction=0.3)
    assert len(ds) == len(eval_files)
    for i in range(len(ds)):
        x = ds[i]
        assert names[int(x["label"])] == os.path.basename(os.path.dirname(eval_files[int(x["id"])]))
        # eval at the written size is the file itself
        np.testing.assert_array_equal(_to_uint8(x["image"]), _read_png(eval_files[i]))
    train, _ = images.image_folder(root, "train", image_size=16, eval_fraction=0.3)
    for x in train._getitems(range(10)):
        assert x["image"].shape == (16, 16, 3) and x["image"].dtype == np.float32
        assert -1 <= x["image"].min() <= x["image"].max() <= 1
        f = train_files[int(x["id"])]
        assert names[int(x["label"])] == os.path.basename(os.path.dirname(f))


def test_train_val_subfolder_layout(tmp_path):
    images.write_image_folder(str(tmp_path / "train"), num_per_class=3, image_size=16)
    images.write_image_folder(str(tmp_path / "val"), num_per_class=2, image_size=16, seed=1)
    train, names = images.image_folder(str(tmp_path), "train", image_size=16)
    evals, eval_names = images.image_folder(str(tmp_path), "eval", image_size=16)
    assert names == eval_names == sorted(images.SHAPE_KINDS)
    assert len(evals) == 16
    labels = [int(x["label"]) for x in evals]
    assert labels == sorted(labels) and set(labels) == set(range(8))
    assert sorted(int(train[i]["id"]) for i in range(24)) == list(range(24))


def test_eval_crops_the_centre_and_train_flips(tmp_path):
    # red outer columns, blue elsewhere: the centre square (columns 10..30) and the few pixels
    # the resampling filter reads around it are all blue
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :5, 0] = img[:, 35:, 0] = 255
    img[:, 5:35, 2] = 255
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "a")
        Image.fromarray(img).save(tmp_path / split / "a" / "x.png")
    evals, _ = images.image_folder(str(tmp_path), "eval", image_size=8)
    np.testing.assert_allclose(evals[0]["image"][..., 2], 1.0)
    np.testing.assert_allclose(evals[0]["image"][..., 0], -1.0)
    # a left-to-right gradient: a crop keeps it increasing unless flipped; both must happen
    ramp = np.broadcast_to(np.linspace(0, 255, 40).astype(np.uint8)[None, :, None], (20, 40, 3))
    Image.fromarray(np.ascontiguousarray(ramp)).save(tmp_path / "train" / "a" / "x.png")
    train, _ = images.image_folder(str(tmp_path), "train", image_size=8)
    crops = train._getitems(range(16))
    slopes = {np.sign(x["image"][4, -1, 0] - x["image"][4, 0, 0]) for x in crops}
    assert slopes == {-1.0, 1.0}


def test_train_augmentation_is_deterministic_per_seed_and_differs_across_epochs(tmp_path):
    images.write_image_folder(str(tmp_path), num_per_class=2, image_size=32)
    a, _ = images.image_folder(str(tmp_path), "train", image_size=16, seed=0, eval_fraction=0.2)
    b, _ = images.image_folder(str(tmp_path), "train", image_size=16, seed=0, eval_fraction=0.2)
    c, _ = images.image_folder(str(tmp_path), "train", image_size=16, seed=1, eval_fraction=0.2)
    for i in range(6):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(6))
    n = len(images.list_image_folder(str(tmp_path), "train", eval_fraction=0.2)[0])
    # every epoch holds each file once, in a new order, with new crops
    epoch1 = [int(a[n + i]["id"]) for i in range(n)]
    assert sorted(epoch1) == list(range(n))
    again = a[n + epoch1.index(int(a[0]["id"]))]
    assert not np.array_equal(a[0]["image"], again["image"])


def test_grey_palette_rgba_and_jpeg_images_become_rgb(tmp_path):
    os.makedirs(tmp_path / "train" / "c")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / "a.png")
    d = tmp_path / "val" / "c"
    os.makedirs(d)
    rgb = images.draw_scene(np.random.default_rng(0), 16)["image"]
    Image.fromarray(rgb).convert("L").save(d / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(d / "alpha.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.gif")
    Image.fromarray(rgb).convert("P").save(d / "see-through.png", transparency=bytes(range(16)))
    Image.fromarray(rgb).save(d / "photo.JPG")  # extensions are case-insensitive
    (d / ".hidden.png").write_bytes(b"not an image")  # hidden files are skipped
    (d / "notes.txt").write_text("not an image either")
    files, _, _ = images.list_image_folder(str(tmp_path), "eval")
    assert [os.path.basename(f) for f in files] == ["alpha.png", "grey.png", "palette.gif",
                                                    "photo.JPG", "see-through.png"]
    ds, _ = images.image_folder(str(tmp_path), "eval", image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's palette-transparency warning included
        for i in range(len(ds)):
            assert ds[i]["image"].shape == (16, 16, 3)
    grey = ds[1]["image"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_array_equal(_to_uint8(ds[0]["image"]), rgb)  # alpha dropped


def test_corrupt_image_raises_config_error_naming_the_file(tmp_path):
    for folder in ("train", "val"):
        images.write_image_folder(str(tmp_path / folder), num_per_class=1, image_size=16)
        (tmp_path / folder / "star" / "x.png").write_bytes(b"\x89PNG garbage, not an image")
    for split, folder in (("train", "train"), ("eval", "val")):
        # every header is read before anything trains (tests/test_data_faults.py: mid-run)
        with pytest.raises(ConfigError, match=re.escape(str(tmp_path / folder / "star" / "x.png"))):
            images.image_folder(str(tmp_path), split, image_size=16)


def test_bad_folder_structure_raises_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        images.image_folder(str(tmp_path / "missing"), "train", image_size=8)
    with pytest.raises(ConfigError, match="no class sub-folders"):
        images.image_folder(str(tmp_path), "train", image_size=8)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    with pytest.raises(ConfigError, match="no images at all"):
        images.image_folder(str(tmp_path), "train", image_size=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    dog = re.escape(repr(str(tmp_path / "dog")))
    with pytest.raises(ConfigError, match=dog + " has no images"):
        images.image_folder(str(tmp_path), "train", image_size=8)
