"""models/detr/coco.py: the COCO loader, its augmentation, the shapes scenes written as COCO, and
COCO mAP."""
from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from models.detr import coco
from trainer.config import ConfigError
from models.images import SHAPE_KINDS, draw_scene

KINDS = ("square", "circle")
# background, then the colour of contiguous label 0, 1, ...: far apart, so a canvas pixel's
# nearest palette colour tells which object (or the background) it shows
PALETTE = np.array([[128, 128, 128], [230, 30, 30], [30, 200, 30], [40, 40, 230],
                    [230, 230, 30], [30, 220, 220]], np.float32)


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    """Normalised (cx, cy, w, h) [..., 4] -> (x1, y1, x2, y2)."""
    return np.concatenate([boxes[..., :2] - boxes[..., 2:] / 2,
                           boxes[..., :2] + boxes[..., 2:] / 2], -1)


def _shapes(tmp_path, **kw):
    args = dict(num_train=4, num_eval=12, image_size=32, max_shapes=3, kinds=KINDS)
    return coco.write_shapes_coco(str(tmp_path / "shapes"), **{**args, **kw})


def _write_rects(root, images, categories=(11, 3, 7), ext="png", extra=None):
    """A hand-made COCO dataset of flat rectangles on a grey background.

    images: [(h, w, [(x1, y1, x2, y2, label)])], label k drawn in PALETTE[1 + k] and annotated
    with category sorted(categories)[k]; the JSON lists the categories in the given order.
    Image i has id 100 + i. Returns (json path, image dir)."""
    os.makedirs(root / "img", exist_ok=True)
    cats = sorted(categories)
    data = {"images": [], "annotations": [],
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    for i, (h, w, rects) in enumerate(images):
        img = np.empty((h, w, 3), np.uint8)
        img[:] = PALETTE[0]
        for x1, y1, x2, y2, k in rects:
            img[y1:y2, x1:x2] = PALETTE[1 + k]
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": 100 + i, "category_id": cats[k],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        name = f"{i}.{ext}"
        Image.fromarray(img).save(root / "img" / name, quality=95)
        data["images"].append({"id": 100 + i, "file_name": name, "width": w, "height": h})
    if extra:
        extra(data)
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return str(path), str(root / "img")


def _colour_index(example) -> np.ndarray:
    """int [S, S]: the nearest PALETTE entry of each real canvas pixel, -1 on padding."""
    rgb = (example["image"] + 1) * 127.5
    idx = np.argmin(((rgb[..., None, :] - PALETTE) ** 2).sum(-1), -1)
    return np.where(example["pad_mask"], idx, -1)


def _tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _detections(examples, image_size, category_ids, labels=None):
    """Each example's real boxes as detections with score 1 (labels overridable)."""
    dets = []
    for e in examples:
        n = int(e["box_mask"].sum())
        lab = e["labels"][:n] if labels is None else labels(e["labels"][:n])
        dets += coco.to_coco_detections(
            [e["image_id"]], np.ones((1, n)), lab[None], _xyxy(e["boxes"][:n])[None],
            [e["scale"]], category_ids, image_size=image_size, orig_size=[e["orig_size"]])
    return dets


# ----------------------------------------------------------------------------- embedded data
@pytest.mark.parametrize("canvas", [32, 48])
def test_eval_split_round_trips_the_generators_scenes(tmp_path, canvas):
    paths = _shapes(tmp_path)
    ds = coco.coco_detection(paths["eval_annotations"], paths["eval_images"], "eval",
                             image_size=canvas, max_objects=4)
    assert len(ds) == 12
    for i in range(12):
        scene = draw_scene(np.random.default_rng((4, 0, 1, i)), 32, min_shapes=1, max_shapes=3,
                           noise=0.1, kinds=KINDS)
        e = ds[i]
        spec = {"image": (np.float32, (canvas, canvas, 3)), "pad_mask": (bool, (canvas, canvas)),
                "boxes": (np.float32, (4, 4)), "labels": (np.int32, (4,)),
                "box_mask": (bool, (4,)), "image_id": (np.int32, ()), "scale": (np.float32, ()),
                "orig_size": (np.int32, (2,)), "id": (np.int32, ())}
        assert {k: (v.dtype, v.shape) for k, v in e.items()} == \
            {k: (np.dtype(t), s) for k, (t, s) in spec.items()}
        n = len(scene["boxes"])
        assert e["box_mask"].tolist() == [True] * n + [False] * (4 - n)
        assert int(e["image_id"]) == i + 1 and int(e["id"]) == i
        assert e["orig_size"].tolist() == [32, 32] and e["pad_mask"].all()
        assert e["scale"] == pytest.approx(32 / canvas)
        pixels = _xyxy(e["boxes"][:n]) * canvas * e["scale"]
        np.testing.assert_allclose(pixels, scene["boxes"], atol=1e-3)
        want = [KINDS.index(SHAPE_KINDS[c]) for c in scene["classes"]]
        assert e["labels"][:n].tolist() == want
        assert not e["boxes"][n:].any() and not e["labels"][n:].any()
        assert e["image"].min() >= -1 and e["image"].max() <= 1
        if canvas == 32:  # no resampling: the PNG's pixels exactly
            np.testing.assert_array_equal(np.rint((e["image"] + 1) * 127.5), scene["image"])


def test_writing_the_shapes_dataset_twice_is_idempotent(tmp_path):
    paths = _shapes(tmp_path)
    files = [paths["train_annotations"], paths["eval_annotations"],
             os.path.join(paths["eval_images"], "000003.png")]
    before = [os.stat(f).st_mtime_ns for f in files]
    assert _shapes(tmp_path) == paths
    assert [os.stat(f).st_mtime_ns for f in files] == before
    info = json.loads(open(paths["eval_annotations"]).read())["info"]["generator"]
    assert info["num_eval"] == 12 and info["split"] == "eval"
    old = open(paths["eval_annotations"]).read()
    _shapes(tmp_path, seed=1)  # other parameters: rewritten
    assert open(paths["eval_annotations"]).read() != old
    data = coco.load_coco(paths["train_annotations"], paths["train_images"])
    assert data.category_ids == (1, 2) and data.category_names == KINDS
    assert coco.num_classes(paths["train_annotations"]) == 2


# ----------------------------------------------------------------------------- evaluation
def test_ground_truth_as_predictions_scores_ap_one_and_wrong_predictions_do_not(tmp_path):
    paths = _shapes(tmp_path)
    ds = coco.coco_detection(paths["eval_annotations"], paths["eval_images"], "eval",
                             image_size=48, max_objects=4)
    examples = [ds[i] for i in range(len(ds))]
    gt = coco.coco_ground_truth(paths["eval_annotations"])
    right = coco.coco_evaluate(gt, _detections(examples, 48, (1, 2)))
    assert right["AP"] == pytest.approx(1.0) and right["AP50"] == pytest.approx(1.0)
    assert set(right) == set(coco.AP_KEYS)
    assert coco.coco_evaluate(paths["eval_annotations"], _detections(examples, 48, (1, 2))) \
        == right  # a path works as well as a COCO object
    wrong_class = coco.coco_evaluate(gt, _detections(examples, 48, (1, 2), lambda lab: 1 - lab))
    assert wrong_class["AP50"] < 0.2
    # every image gets the next image's boxes
    shifted = [dict(e, image_id=examples[(i + 1) % 12]["image_id"])
               for i, e in enumerate(examples)]
    assert coco.coco_evaluate(gt, _detections(shifted, 48, (1, 2)))["AP50"] < 0.5
    assert coco.coco_evaluate(gt, []) == dict.fromkeys(coco.AP_KEYS, 0.0)
    # an evaluation of half the images: only those count when named
    half = examples[:6]
    ids = [int(e["image_id"]) for e in half]
    assert coco.coco_evaluate(gt, _detections(half, 48, (1, 2)), image_ids=ids)["AP"] \
        == pytest.approx(1.0)
    assert coco.coco_evaluate(gt, _detections(half, 48, (1, 2)))["AP"] < 0.75


def test_to_coco_detections_maps_the_canvas_back_and_clips_to_the_image():
    dets = coco.to_coco_detections(
        np.array([7]), np.array([[0.9, 0.5]]), np.array([[1, 0]]),
        np.array([[[0.25, 0.5, 0.75, 1.0], [-0.1, 0.0, 1.0, 0.9]]]), np.array([2.0]), (3, 11),
        image_size=32, orig_size=[[40, 64]])
    assert dets[0] == {"image_id": 7, "category_id": 11, "bbox": [16.0, 32.0, 32.0, 8.0],
                       "score": pytest.approx(0.9)}
    assert dets[1]["category_id"] == 3
    np.testing.assert_allclose(dets[1]["bbox"], [0.0, 0.0, 64.0, 40.0])


# ----------------------------------------------------------------------------- real layouts
RECTS = [(40, 64, [(4, 6, 20, 30, 0), (26, 2, 40, 14, 1), (44, 20, 60, 38, 2)]),
         (64, 40, [(2, 4, 18, 20, 0), (22, 10, 38, 26, 1), (6, 36, 30, 60, 2)]),
         (48, 48, [(0, 0, 14, 16, 0), (18, 20, 30, 46, 1), (34, 8, 48, 30, 2)])]


def test_eval_pads_a_non_square_image_and_boxes_follow_its_pixels(tmp_path):
    path, images = _write_rects(tmp_path, RECTS)
    assert coco.read_categories(path) == ((3, 7, 11), ("c3", "c7", "c11"))
    ds = coco.coco_detection(path, images, "eval", image_size=32, max_objects=4)
    for i, (h, w, rects) in enumerate(RECTS):
        e = ds[i]
        scale = max(h, w) / 32
        assert e["scale"] == pytest.approx(scale) and e["orig_size"].tolist() == [h, w]
        nh, nw = round(h / scale), round(w / scale)
        assert e["pad_mask"][:nh, :nw].all() and e["pad_mask"].sum() == nh * nw
        assert not e["image"][~e["pad_mask"]].any()  # padding is 0
        np.testing.assert_allclose(_xyxy(e["boxes"][:3]) * 32 * scale,
                                   [r[:4] for r in rects], atol=1e-3)
        assert e["labels"][:3].tolist() == [0, 1, 2]
        colours = _colour_index(e)
        for j in range(3):
            np.testing.assert_allclose(_tight_box(colours == 1 + j), _xyxy(e["boxes"][j]) * 32,
                                       atol=1.0)
    right = coco.coco_evaluate(path, _detections([ds[i] for i in range(3)], 32, (3, 7, 11)))
    assert right["AP"] == pytest.approx(1.0)


def test_jpeg_decoded_at_reduced_scale_keeps_boxes_on_their_pixels(tmp_path):
    # a 320 x 480 JPEG into a 32 canvas: PIL decodes it at 1/4 (draft), the mapping must hold
    big = [(320, 480, [(40, 48, 160, 240, 0), (200, 16, 320, 112, 1), (352, 160, 472, 304, 2)])]
    path, images = _write_rects(tmp_path, big, ext="jpg")
    e = coco.coco_detection(path, images, "eval", image_size=32, max_objects=3)[0]
    assert e["scale"] == pytest.approx(15.0)
    colours = _colour_index(e)
    for j in range(3):
        np.testing.assert_allclose(_tight_box(colours == 1 + j), _xyxy(e["boxes"][j]) * 32,
                                   atol=1.0)


def test_train_augmentation_keeps_boxes_on_their_pixels(tmp_path):
    path, images = _write_rects(tmp_path, RECTS)
    ds = coco.coco_detection(path, images, "train", image_size=32, max_objects=4)
    scales, flipped, dropped = set(), 0, 0
    for i in range(60):
        e = ds[i]
        h, w = e["orig_size"].tolist()
        scales.add(round(float(e["scale"]) / (max(h, w) / 32), 3))
        n = int(e["box_mask"].sum())
        dropped += n < 3
        colours = _colour_index(e)
        boxes = _xyxy(e["boxes"][:n]) * 32
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert e["pad_mask"][0, 0] and not e["image"][~e["pad_mask"]].any()
        for b, lab in zip(boxes, e["labels"][:n]):
            if min(b[2] - b[0], b[3] - b[1]) >= 1.5:  # slivers may blend into the background
                np.testing.assert_allclose(_tight_box(colours == 1 + lab), b, atol=1.0)
        for lab in range(3):  # every object still visible has its box
            if (colours == 1 + lab).sum() >= 3:
                assert lab in e["labels"][:n].tolist()
        if n == 3:  # label 0 is drawn left of label 1 in every image
            flipped += boxes[0, 0] > boxes[1, 0]
    assert len(scales) > 10 and flipped > 5 and dropped > 0  # resize, flip and crop all happen


def test_train_augmentation_is_deterministic_per_seed_and_differs_across_epochs(tmp_path):
    path, images = _write_rects(tmp_path, RECTS)
    make = lambda seed: coco.coco_detection(path, images, "train", image_size=32,
                                            max_objects=4, seed=seed)
    a, b, c = make(0), make(0), make(1)
    first = [a[i] for i in range(6)]
    for x, y in zip(first, b._getitems(range(6))):  # batched reads give the same examples
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["image"], c[i]["image"]) for i, x in enumerate(first))
    epoch2 = [int(a[3 + i]["id"]) for i in range(3)]
    assert sorted(epoch2) == [0, 1, 2]
    again = a[3 + epoch2.index(int(a[0]["id"]))]
    assert not np.array_equal(a[0]["image"], again["image"])


def test_objects_beyond_max_objects_are_dropped_smallest_first_and_counted(tmp_path):
    rects = [(48, 48, [(0, 0, 20, 20, 0), (22, 0, 26, 4, 1), (0, 24, 30, 46, 2),
                       (32, 30, 34, 32, 3), (32, 0, 46, 16, 4)])]
    path, images = _write_rects(tmp_path, rects, categories=(1, 2, 3, 4, 5))
    assert coco.load_coco(path, images).objects_beyond(3) == 2
    with pytest.warns(UserWarning, match=r"1 images .* max_objects=3 objects: 2 objects will"):
        ds = coco.coco_detection(path, images, "eval", image_size=48, max_objects=3)
    e = ds[0]
    assert e["box_mask"].all() and e["labels"].tolist() == [0, 2, 4]
    np.testing.assert_allclose(_xyxy(e["boxes"]) * 48, [r[:4] for r in rects[0][2][::2]],
                               atol=1e-4)


def test_crowd_annotations_are_not_targets_and_empty_images_are_kept(tmp_path):
    def add(data):
        data["annotations"].append({"id": 99, "image_id": 100, "category_id": 3,
                                    "bbox": [30, 30, 20, 8], "area": 100.0, "iscrowd": 1})
        data["images"].append({"id": 500, "file_name": "0.png", "width": 64, "height": 40})
    path, images = _write_rects(tmp_path, RECTS[:1], extra=add)
    data = coco.load_coco(path, images)
    assert data.num_crowd == 1 and len(data) == 2 and len(data.boxes[0]) == 3
    ds = coco.coco_detection(path, images, "eval", image_size=32, max_objects=4)
    assert ds[0]["box_mask"].sum() == 3 and not ds[1]["box_mask"].any()
    # COCOeval ignores the crowd region: the real objects still score AP 1
    assert coco.coco_evaluate(path, _detections([ds[0]], 32, (3, 7, 11)))["AP"] == \
        pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad input
def _set(key, value, index=0, where="annotations"):
    def edit(data):
        data[where][index][key] = value
    return edit


def _delete(key):
    def edit(data):
        del data[key]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("bbox", [20, 20, 30, 5]), r"annotation 1 \(image '.*0\.png'\).*outside the 32x32"),
    (_set("bbox", [2, 2, -3, 5]), r"annotation 1 \(image '.*0\.png'\).*negative"),
    (_set("bbox", [2, 2, 3]), r"annotation 1 .*not four numbers"),
    (_set("category_id", 42), r"annotation 1 \(image '.*0\.png'\).*category id 42"),
    (_set("image_id", 12345), r"annotation 1 .*image id 12345"),
    (_set("file_name", "nope.png", where="images"), r"do not exist: '.*nope\.png'"),
    (_delete("categories"), r"not a COCO instances file: it has no 'categories'"),
])
def test_bad_annotation_file_raises_config_error_naming_the_problem(tmp_path, edit, message):
    path, images = _write_rects(tmp_path, [(32, 32, [(1, 1, 9, 9, 0)]),
                                           (32, 32, [(4, 4, 20, 20, 1)])], extra=edit)
    with pytest.raises(ConfigError, match=message):
        coco.load_coco(path, images)


def test_unreadable_files_raise_config_error_naming_them(tmp_path):
    path, images = _write_rects(tmp_path, RECTS)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        coco.load_coco(str(bad), images)
    with pytest.raises(ConfigError, match="does not exist"):
        coco.load_coco(str(tmp_path / "missing.json"), images)
    good = (tmp_path / "img" / "1.png").read_bytes()
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG garbage, not an image")
    for split in ("eval", "train"):  # every header is checked before anything trains
        with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "img" / "1.png"))):
            coco.coco_detection(path, images, split, image_size=16, max_objects=4)
    (tmp_path / "img" / "1.png").write_bytes(good)
    Image.new("RGB", (10, 10)).save(tmp_path / "img" / "2.png")  # not the JSON's 48 x 48
    with pytest.raises(ConfigError, match=r"2\.png: ValueError: \(10, 10\) pixels, the "
                                          r"annotation file says \(48, 48\)"):
        coco.coco_detection(path, images, "eval", image_size=16, max_objects=4)
    with pytest.warns(UserWarning, match=r"2\.png"):  # skip_bad: the image is left out
        ds = coco.coco_detection(path, images, "eval", image_size=16, max_objects=4,
                                 skip_bad=True)
    assert len(ds) == 2


def test_zero_size_boxes_are_skipped_with_a_warning(tmp_path):
    path, images = _write_rects(tmp_path, RECTS[:1], extra=_set("bbox", [4, 6, 16, 0]))
    with pytest.warns(UserWarning, match=r"1 annotations with a zero-size box .*ids \[1\]"):
        data = coco.load_coco(path, images)
    assert data.zero_size == (1,) and data.labels[0].tolist() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coco.load_coco(*_write_rects(tmp_path / "ok", RECTS[:1]))
