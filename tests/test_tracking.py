"""models/mixformer/tracking.py: GOT-10k loading, the embedded shapes sequences, crops, training pairs,
benchmark metrics and result files."""
from __future__ import annotations

import math
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from models.mixformer import tracking
from trainer.config import ConfigError
from models.images import draw_sequence
from models.mixformer.tracking import (CropTransform, Sequence, TrackingPairs, auc, center_errors, crop,
                              evaluate_results, iou_xywh, jittered_box, load_got10k, read_result,
                              success_curve, success_plot, tracking_pairs, write_result,
                              write_shapes_got10k, xywh_to_xyxy, xyxy_to_xywh)

S, F = 64, 12
SHAPES = dict(num_sequences=3, num_frames=F, image_size=S, seed=0, num_val_sequences=2)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_shapes_got10k(str(tmp_path_factory.mktemp("got10k")), **SHAPES)


@pytest.fixture(scope="module")
def train_seqs(shapes_root):
    return load_got10k(shapes_root, "train")


def _generated(split_id: int, k: int) -> dict:
    """The generator's own video k of a split (the recipe write_shapes_got10k documents)."""
    return draw_sequence(np.random.default_rng((3, 0, split_id, k)), S, F)


# ----------------------------------------------------------------------------- GOT-10k layout
def test_loader_round_trips_the_embedded_sequences(shapes_root, train_seqs):
    assert [s.name for s in train_seqs] == [f"GOT-10k_Train_{k:06d}" for k in (1, 2, 3)]
    for k, seq in enumerate(train_seqs):
        video = _generated(0, k)
        assert len(seq) == F and seq.boxes.dtype == np.float32 and seq.boxes.shape == (F, 4)
        np.testing.assert_array_equal(seq.boxes_xyxy, video["boxes"])
        np.testing.assert_array_equal(seq.absent, ~video["visible"])
        for f in range(F):
            np.testing.assert_array_equal(seq.frame(f), video["frames"][f])
    val = load_got10k(shapes_root, "val")
    assert [s.name for s in val] == ["GOT-10k_Val_000001", "GOT-10k_Val_000002"]
    # disjoint seeds: no val video is a train video
    for v in val:
        assert all(not np.array_equal(v.frame(0), t.frame(0)) for t in train_seqs)
    np.testing.assert_array_equal(val[1].boxes_xyxy, _generated(1, 1)["boxes"])


def test_box_conversions_are_inverse():
    b = np.array([[3.5, 4.0, 10.0, 2.25], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(xywh_to_xyxy(b), [[3.5, 4.0, 13.5, 6.25], [0, 0, 1, 1]])
    np.testing.assert_array_equal(xyxy_to_xywh(xywh_to_xyxy(b)), b)


def test_writing_is_idempotent(tmp_path):
    root = str(tmp_path / "d")
    params = dict(num_sequences=2, num_frames=4, image_size=32, seed=1)
    write_shapes_got10k(root, **params)
    marker = os.path.join(root, "train", "GOT-10k_Train_000001", "00000001.png")
    before = os.stat(marker)
    write_shapes_got10k(root, **params)
    after = os.stat(marker)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # other parameters: rewritten, nothing stale left (no hidden temporary directories either)
    write_shapes_got10k(root, **{**params, "num_frames": 6})
    assert [len(s) for s in load_got10k(root, "train")] == [6, 6]
    assert sorted(os.listdir(root)) == ["train", "val"]


def test_writer_never_replaces_foreign_data(tmp_path):
    os.makedirs(tmp_path / "train")
    (tmp_path / "train" / "list.txt").write_text("GOT-10k_Train_000001\n")
    with pytest.raises(ConfigError, match="not written by write_shapes_got10k"):
        write_shapes_got10k(str(tmp_path), num_sequences=1, num_frames=2, image_size=32)
    assert (tmp_path / "train" / "list.txt").read_text() == "GOT-10k_Train_000001\n"


def _tiny_got10k(root, names=("seq_a", "seq_b", "seq_c"), frames=4):
    """A hand-written GOT-10k split: 16 x 16 PNG frames, boxes (1+k, 2, 5, 6)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "list.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    for name in names:
        d = os.path.join(root, name)
        os.makedirs(d)
        for k in range(frames):
            Image.fromarray(np.full((16, 16, 3), 10 * k, np.uint8)).save(
                os.path.join(d, f"{k + 1:08d}.png"))
        with open(os.path.join(d, "groundtruth.txt"), "w") as f:
            f.write("".join(f"{1 + k},2,5,6\n" for k in range(frames)))
    return root


def test_loader_reads_the_format(tmp_path):
    root = _tiny_got10k(str(tmp_path / "val"))
    with open(os.path.join(root, "seq_b", "groundtruth.txt"), "w") as f:
        f.write("1 2 5 6\n2\t2\t5\t6\n0,0,0,0\n4.5,2,5,6\n\n")  # whitespace too; trailing blank
    with open(os.path.join(root, "seq_b", "absence.label"), "w") as f:
        f.write("0\n0\n1\n0\n")  # frame 3 absent: its zero-size box is allowed
    seqs = load_got10k(str(tmp_path), "val")
    b = seqs[1]
    np.testing.assert_array_equal(b.boxes, [[1, 2, 5, 6], [2, 2, 5, 6], [0, 0, 0, 0],
                                            [4.5, 2, 5, 6]])
    np.testing.assert_array_equal(b.absent, [False, False, True, False])
    np.testing.assert_array_equal(b.usable, [True, True, False, True])
    assert b.frame(2)[0, 0, 0] == 20 and b.frames[0].endswith("seq_b/00000001.png")


@pytest.mark.parametrize("case, pattern", [
    ("missing_gt", r"sequence 'seq_b': missing .*seq_b/groundtruth\.txt"),
    ("short_gt", r"sequence 'seq_b': .*seq_b/groundtruth\.txt:3: groundtruth\.txt is short"),
    ("malformed", r"sequence 'seq_b': .*seq_b/groundtruth\.txt:2: expected 'x,y,w,h'.*'2,2,x,6'"),
    ("zero_size", r"sequence 'seq_b': .*seq_b/groundtruth\.txt:4: zero-size box"),
    ("missing_frame", r"sequence 'seq_b': missing frame .*seq_b/00000002\.png"),
    ("missing_last_frame", r"sequence 'seq_b': .*4 boxes but only 3 frames.*00000004\.png"),
    ("bad_absence", r"sequence 'seq_b': .*seq_b/absence\.label:2: expected 0 or 1"),
    ("missing_dir", r"sequence 'seq_b': directory .*seq_b.* does not exist"),
])
def test_bad_annotations_name_sequence_file_and_line(tmp_path, case, pattern):
    root = _tiny_got10k(str(tmp_path))
    d = os.path.join(root, "seq_b")
    gt = os.path.join(d, "groundtruth.txt")
    if case == "missing_gt":
        os.remove(gt)
    elif case == "short_gt":
        open(gt, "w").write("1,2,5,6\n1,2,5,6\n")
    elif case == "malformed":
        open(gt, "w").write("1,2,5,6\n2,2,x,6\n1,2,5,6\n1,2,5,6\n")
    elif case == "zero_size":
        open(gt, "w").write("1,2,5,6\n1,2,5,6\n1,2,5,6\n1,2,0,6\n")
    elif case == "missing_frame":
        os.remove(os.path.join(d, "00000002.png"))
    elif case == "missing_last_frame":
        os.remove(os.path.join(d, "00000004.png"))
    elif case == "bad_absence":
        open(os.path.join(d, "absence.label"), "w").write("0\n2\n0\n0\n")
    elif case == "missing_dir":
        shutil.rmtree(d)
    with pytest.raises(ConfigError, match=pattern):
        load_got10k(root)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 sequences") as record:
        seqs = load_got10k(root, skip_bad=True)
    assert [s.name for s in seqs] == ["seq_a", "seq_c"] and len(record) == 1


def test_missing_list_and_unreadable_frame(tmp_path):
    with pytest.raises(ConfigError, match=r"missing .*train/list\.txt"):
        load_got10k(str(tmp_path), "train")
    root = _tiny_got10k(str(tmp_path / "x"))
    bad = os.path.join(root, "seq_a", "00000003.png")
    open(bad, "wb").write(b"not a png")
    seq = load_got10k(root)[0]  # frames are decoded when read
    with pytest.raises(ConfigError, match=r"sequence 'seq_a': cannot read frame .*00000003\.png"):
        seq.frame(2)


def test_skip_bad_counts_every_skipped_sequence_in_one_warning(tmp_path):
    root = _tiny_got10k(str(tmp_path))
    os.remove(os.path.join(root, "seq_a", "groundtruth.txt"))
    os.remove(os.path.join(root, "seq_c", "groundtruth.txt"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        seqs = load_got10k(root, skip_bad=True)
    assert [s.name for s in seqs] == ["seq_b"]
    assert len(record) == 1 and "skipped 2 of 3" in str(record[0].message)


def test_first_box_only_accepts_the_test_split(tmp_path):
    root = _tiny_got10k(str(tmp_path))
    open(os.path.join(root, "seq_a", "groundtruth.txt"), "w").write("3,4,5,6\n")
    with pytest.raises(ConfigError, match="short"):
        load_got10k(root)
    seq = load_got10k(root, first_box_only=True)[0]
    np.testing.assert_array_equal(seq.boxes[0], [3, 4, 5, 6])
    assert np.isnan(seq.boxes[1:]).all() and seq.usable.tolist() == [True, False, False, False]


# ----------------------------------------------------------------------------- crops
def _reference_crop(frame, x0, y0, side, out, fill=None):
    """An independent crop: pad the frame on every side, slice, PIL-resize."""
    m = side + abs(x0) + abs(y0) + max(frame.shape)  # enough padding for any crop asked for
    padded = np.pad(frame, ((m, m), (m, m), (0, 0)), constant_values=0)
    if fill is not None:
        padded[np.pad(np.zeros(frame.shape[:2], bool), m, constant_values=True)] = fill
    region = padded[y0 + m:y0 + m + side, x0 + m:x0 + m + side]
    if side != out:
        region = np.asarray(Image.fromarray(region).resize((out, out), Image.BILINEAR))
    return region.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)  # images._to_float


def test_crop_geometry_is_pytracking_sample_target():
    frame = np.zeros((50, 60, 3), np.uint8)
    _, t = crop(frame, (10.7, 20.6, 30, 40), 2.0, 35)
    # side = ceil(sqrt(30 * 40) * 2) = ceil(69.28) = 70; corner = round(centre - 35):
    # round(25.7 - 35) = -9, round(40.6 - 35) = 6
    assert (t.side, t.x0, t.y0, t.out_size) == (70, -9, 6, 35) and t.scale == 0.5
    np.testing.assert_allclose(t.to_crop([10.7, 20.6, 30, 40]),
                               [19.7 / 70, 14.6 / 70, 49.7 / 70, 54.6 / 70])


def test_crops_map_boxes_back_exactly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(8, 200, 2)
        # boxes anywhere, partly or wholly outside the frame included
        box = np.array([rng.uniform(-0.5 * w, w), rng.uniform(-0.5 * h, h),
                        rng.uniform(0.5, w), rng.uniform(0.5, h)])
        factor, out = rng.uniform(0.5, 5.0), int(rng.integers(1, 300))
        t = tracking.crop_region(box, factor, out)
        norm = t.to_crop(box)
        np.testing.assert_allclose(t.to_frame(norm), box, rtol=0, atol=1e-9)
        np.testing.assert_allclose(t.to_crop(t.to_frame(norm)), norm, rtol=0, atol=1e-12)
        # the crop's own edges are 0 and 1
        np.testing.assert_allclose(t.to_crop([t.x0, t.y0, t.side, t.side]), [0, 0, 1, 1])
    batch = rng.uniform(1, 50, (5, 3, 4))
    t = CropTransform(-3.0, 7.0, 40.0, 16)
    np.testing.assert_allclose(t.to_frame(t.to_crop(batch)), batch, atol=1e-12)


@pytest.mark.parametrize("pad", ["black", "mean"])
def test_crop_pixels_are_the_frame_region(pad):
    rng = np.random.default_rng(1)
    for _ in range(30):
        frame = rng.integers(0, 256, (int(rng.integers(10, 60)), int(rng.integers(10, 60)), 3),
                             np.uint8)
        h, w = frame.shape[:2]
        box = (rng.uniform(-10, w), rng.uniform(-10, h), rng.uniform(1, w), rng.uniform(1, h))
        factor = rng.uniform(1, 4)
        t = tracking.crop_region(box, factor, 8)
        side = int(t.side)
        fill = np.rint(frame.reshape(-1, 3).mean(0)).astype(np.uint8) if pad == "mean" else 0
        for out in (side, 16):  # no resize: a pure copy; resize: the same region resampled
            patch, t = crop(frame, box, factor, out, pad=pad)
            assert patch.shape == (out, out, 3) and patch.dtype == np.float32
            ref = _reference_crop(frame, int(t.x0), int(t.y0), side, out,
                                  fill if pad == "mean" else None)
            np.testing.assert_array_equal(patch, ref)


def test_a_drawn_target_lands_where_the_transform_says():
    frame = np.zeros((120, 160, 3), np.uint8)
    box = np.array([97.0, 31.0, 24.0, 14.0])
    frame[31:45, 97:121] = 255
    for factor, out in ((2.0, 32), (4.5, 96), (3.0, 128)):
        patch, t = crop(frame, box, factor, out)
        mass = (patch[..., 0] + 1) / 2
        ys, xs = np.mgrid[:out, :out] + 0.5
        cx, cy = (xs * mass).sum() / mass.sum(), (ys * mass).sum() / mass.sum()
        x1, y1, x2, y2 = t.to_crop(box) * out
        assert abs(cx - (x1 + x2) / 2) < 0.05 and abs(cy - (y1 + y2) / 2) < 0.05
        np.testing.assert_allclose(mass.sum(), (x2 - x1) * (y2 - y1), rtol=2e-2)


def test_crop_rejects_degenerate_boxes():
    frame = np.zeros((8, 8, 3), np.uint8)
    for box in ((0, 0, 0, 4), (0, 0, 4, -1), (0, 0, np.nan, 4)):
        with pytest.raises(ValueError, match="w, h > 0"):
            crop(frame, box, 2.0, 8)


def test_jitter_statistics_and_determinism():
    box = np.array([40.0, 30.0, 20.0, 10.0])
    sj, cj = 0.25, 3.0
    draws = np.stack([jittered_box(box, np.random.default_rng((7, i)), scale_jitter=sj,
                                   center_jitter=cj) for i in range(4000)])
    log_scale = np.log(draws[:, 2:] / box[2:])
    assert np.abs(log_scale.mean(0)).max() < 0.02
    np.testing.assert_allclose(log_scale.std(0), sj, rtol=0.05)
    offset = (draws[:, :2] + draws[:, 2:] / 2 - (box[:2] + box[2:] / 2))
    rel = offset / np.sqrt(draws[:, 2] * draws[:, 3])[:, None]  # U(-cj/2, cj/2) per axis
    assert np.abs(rel).max() <= cj / 2 and np.abs(rel).max() > 0.95 * cj / 2
    np.testing.assert_allclose(rel.std(0), cj / math.sqrt(12), rtol=0.05)
    assert abs(np.corrcoef(rel[:, 0], rel[:, 1])[0, 1]) < 0.06  # independent axes
    a = jittered_box(box, np.random.default_rng(3), scale_jitter=sj, center_jitter=cj)
    b = jittered_box(box, np.random.default_rng(3), scale_jitter=sj, center_jitter=cj)
    c = jittered_box(box, np.random.default_rng(4), scale_jitter=sj, center_jitter=cj)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(
        jittered_box(box, np.random.default_rng(3), scale_jitter=0, center_jitter=0), box)


# ----------------------------------------------------------------------------- training pairs
def _fake_sequences(lengths, absent_every=0):
    """Sequences without frame files (enough for plans), boxes (k, k, 10, 10)."""
    out = []
    for q, n in enumerate(lengths):
        absent = np.zeros(n, bool)
        if absent_every:
            absent[1::absent_every] = True
        boxes = np.tile(np.array([0, 0, 10, 10], np.float32), (n, 1))
        boxes[:, :2] = np.arange(n)[:, None]
        out.append(Sequence(f"s{q}", tuple(f"/nonexistent/{k}.png" for k in range(n)), boxes,
                            absent))
    return out


def test_pairs_shapes_and_box_is_the_transformed_ground_truth(train_seqs):
    pairs = TrackingPairs(train_seqs, template_size=24, search_size=48, template_factor=2.0,
                          search_factor=4.0, max_gap=4, num_templates=2, samples_per_epoch=16,
                          seed=5)
    assert len(pairs) == 16
    for i in range(8):
        ex, plan = pairs[i], pairs.plan(i)
        assert ex["template"].shape == (2, 24, 24, 3) and ex["template"].dtype == np.float32
        assert ex["search"].shape == (48, 48, 3) and ex["search"].dtype == np.float32
        assert ex["box"].shape == (4,) and ex["box"].dtype == np.float32
        assert ex["label"] == 1 and ex["id"] == i and ex["id"].dtype == np.int32
        seq = train_seqs[plan.sequence]
        for k, f in enumerate(plan.template_frames):  # templates: unjittered, around their GT
            np.testing.assert_array_equal(ex["template"][k],
                                          crop(seq.frame(f), seq.boxes[f], 2.0, 24)[0])
        # the crop that "box" implies (side and corner solved from it and the GT) is the one the
        # search pixels were cut from
        gt = seq.boxes[plan.search_frame].astype(np.float64)
        x1, y1, x2, _ = ex["box"].astype(np.float64)
        side = gt[2] / (x2 - x1)
        assert abs(side - round(side)) < 1e-3 * side
        side = int(round(side))
        x0, y0 = round(gt[0] - x1 * side), round(gt[1] - y1 * side)
        np.testing.assert_allclose(ex["box"], CropTransform(x0, y0, side, 48).to_crop(gt),
                                   atol=1e-5)
        np.testing.assert_array_equal(ex["search"],
                                      _reference_crop(seq.frame(plan.search_frame), x0, y0,
                                                      side, 48))
    np.testing.assert_array_equal(pairs[3]["search"], pairs[3]["search"])  # deterministic
    assert not np.array_equal(pairs[3]["search"], pairs[4]["search"])


def test_template_jitter_moves_only_the_dynamic_templates(train_seqs):
    kw = dict(template_size=24, search_size=48, max_gap=4, num_templates=3, samples_per_epoch=16,
              seed=5)
    plain = TrackingPairs(train_seqs, **kw)
    jit = TrackingPairs(train_seqs, template_jitter=0.5, **kw)
    moved = 0
    for i in range(8):
        ex, plan = jit[i], jit.plan(i)
        assert plan == plain.plan(i)  # the same frames; only the template crops move
        seq = train_seqs[plan.sequence]
        gt = [crop(seq.frame(f), seq.boxes[f], 2.0, 24)[0] for f in plan.template_frames]
        np.testing.assert_array_equal(ex["template"][0], gt[0])  # the initial template: exact
        moved += sum(not np.array_equal(ex["template"][k], gt[k]) for k in (1, 2))
        np.testing.assert_array_equal(ex["template"], jit[i]["template"])  # deterministic
    assert moved >= 14, moved
    with pytest.raises(ConfigError, match="template_jitter"):
        TrackingPairs(train_seqs, template_jitter=-0.1, **kw)


def test_templates_respect_max_gap_and_skip_absent_frames():
    seqs = _fake_sequences([60, 40], absent_every=3)
    gaps = []
    for num_templates in (1, 3):
        pairs = TrackingPairs(seqs, template_size=8, search_size=16, max_gap=5,
                              num_templates=num_templates, samples_per_epoch=400, seed=0)
        for i in range(400):
            p = pairs.plan(i)
            absent = seqs[p.sequence].absent
            assert p.label == 1 and p.search_sequence == p.sequence
            assert not absent[p.search_frame] and not absent[list(p.template_frames)].any()
            dynamic = p.template_frames if num_templates == 1 else p.template_frames[1:]
            assert len(p.template_frames) == num_templates
            gaps += [t - p.search_frame for t in dynamic]
            if num_templates > 1:  # trident: dynamic templates on the initial template's side
                side = 1 if p.template_frames[0] >= p.search_frame else -1
                assert all(side * (t - p.search_frame) >= 0 for t in dynamic)
    gaps = np.array(gaps)
    assert np.abs(gaps).max() == 5 and (gaps == 0).any() and (gaps < 0).any() and (gaps > 0).any()
    pairs = TrackingPairs(seqs, template_size=8, search_size=16, max_gap=0, samples_per_epoch=50)
    assert all(pairs.plan(i).template_frames == (pairs.plan(i).search_frame,) for i in range(50))


def test_negatives_are_labelled_zero(train_seqs):
    pairs = TrackingPairs(train_seqs, template_size=16, search_size=32, max_gap=3,
                          negative_ratio=1.0, samples_per_epoch=12, seed=1)
    for i in range(12):
        ex, p = pairs[i], pairs.plan(i)
        assert ex["label"] == 0 and ex["label"].dtype == np.float32
        np.testing.assert_array_equal(ex["box"], np.zeros(4))
        # an absent frame of the same sequence, or another sequence
        assert (p.search_sequence != p.sequence
                or train_seqs[p.sequence].absent[p.search_frame])
    # both kinds: s0 has absent frames (used first), s1 has none (another sequence instead)
    seqs = _fake_sequences([30]) + _fake_sequences([30])
    seqs[0].absent[1::3] = True
    two = TrackingPairs(seqs, template_size=8, search_size=16, max_gap=2, negative_ratio=1.0,
                        samples_per_epoch=40)
    for i in range(40):
        p = two.plan(i)
        if p.sequence == 0:
            assert p.search_sequence == 0 and seqs[0].absent[p.search_frame]
        else:
            assert p.search_sequence == 0 and not seqs[0].absent[p.search_frame]
    assert {two.plan(i).sequence for i in range(40)} == {0, 1}
    mixed = TrackingPairs(train_seqs, template_size=16, search_size=32, max_gap=3,
                          negative_ratio=0.5, samples_per_epoch=60, seed=1)
    labels = [mixed.plan(i).label for i in range(60)]
    assert 10 < sum(labels) < 50
    only = _fake_sequences([10])
    with pytest.raises(ConfigError, match="negatives"):
        TrackingPairs(only, template_size=8, search_size=16, max_gap=2, negative_ratio=0.5)
    p = TrackingPairs(_fake_sequences([10, 10]), template_size=8, search_size=16, max_gap=2,
                      negative_ratio=1.0, samples_per_epoch=20)
    assert all(p.plan(i).search_sequence != p.plan(i).sequence for i in range(20))


def test_tracking_pairs_datasets(train_seqs):
    kw = dict(template_size=16, search_size=32, max_gap=3, samples_per_epoch=6, seed=2)
    train = tracking_pairs(train_seqs, "train", **kw)
    again = tracking_pairs(train_seqs, "train", **kw)
    first = [train[k] for k in range(6)]
    assert sorted(int(x["id"]) for x in first) == list(range(6))
    np.testing.assert_array_equal(first[2]["search"], again[2]["search"])
    # epoch 2 draws the same source index anew (fresh pairs / jitter)
    second = {int(train[k]["id"]): train[k] for k in range(6, 12)}
    assert not np.array_equal(second[int(first[0]["id"])]["search"], first[0]["search"])
    ev = tracking_pairs(train_seqs, "eval", **kw)
    assert len(ev) == 6
    np.testing.assert_array_equal(ev[4]["search"], TrackingPairs(train_seqs, **kw)[4]["search"])
    with pytest.raises(ValueError, match="split"):
        tracking_pairs(train_seqs, "test", **kw)


# ----------------------------------------------------------------------------- metrics
def _pixel_edge_iou(a, b):
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def test_iou_hand_checked_values():
    a = np.array([[0, 0, 10, 10]] * 5, np.float64)
    b = np.array([[5, 5, 10, 10], [10, 0, 10, 10], [0, 0, 10, 10], [2, 2, 4, 4], [0, 0, 10, 5]])
    np.testing.assert_allclose(iou_xywh(a, b), [25 / 175, 0, 1, 16 / 100, 0.5], atol=1e-12)
    rng = np.random.default_rng(0)
    p, q = rng.uniform(0, 50, (100, 4)), rng.uniform(0, 50, (100, 4))
    np.testing.assert_allclose(iou_xywh(p, q), [_pixel_edge_iou(x, y) for x, y in zip(p, q)],
                               atol=1e-12)
    np.testing.assert_allclose(center_errors([[3, 4, 10, 10]], [[0, 0, 10, 10]]), [5.0])
    np.testing.assert_allclose(center_errors([[3, 4, 10, 10]], [[0, 0, 10, 10]],
                                             normalized=True), [0.5])
    np.testing.assert_allclose(center_errors([[0, 0, 4, 4]], [[0, 0, 2, 2]]), [math.sqrt(2)])


def test_success_curve_counts_iou_strictly_above_threshold():
    curve = success_curve([0.0, 0.5, 1.0])
    assert curve.shape == (21,)
    assert curve[0] == pytest.approx(2 / 3) and curve[10] == pytest.approx(1 / 3)
    assert curve[11] == pytest.approx(1 / 3) and curve[20] == 0
    assert auc(success_curve(np.ones(7))) == pytest.approx(20 / 21, abs=1e-15)


def test_perfect_tracker_scores_auc_20_of_21(train_seqs):
    perfect = {s.name: s.boxes.copy() for s in train_seqs}
    r = evaluate_results(train_seqs, perfect)
    assert r["auc"] == pytest.approx(20 / 21, abs=1e-12)
    for k in ("ao", "sr50", "sr75", "op50", "op75", "precision", "normalized_precision"):
        assert r[k] == pytest.approx(1.0, abs=1e-12), k
    assert r["num_sequences"] == 3 and len(r["success_curve"]) == 21
    assert r["success_curve"][-1] == 0 and set(r["per_sequence"]) == {s.name for s in train_seqs}


def test_staying_on_the_first_box_scores_lower(train_seqs):
    still = {s.name: np.tile(s.boxes[:1], (len(s), 1)) for s in train_seqs}
    r = evaluate_results(train_seqs, still)
    assert r["auc"] < 20 / 21 - 0.2 and r["ao"] < 0.7 and r["sr50"] < 0.8
    assert r["precision"] < 1.0 and r["normalized_precision"] < 0.9


def test_evaluation_conventions():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    seq = Sequence("s", ("a",) * 4, gt, np.array([False, False, True, False]))
    pred = np.array([[50, 50, 5, 5],      # frame 0: set to the ground truth
                     [0, 0, 10, 5],       # IoU 0.5
                     [0, 0, 10, 5],       # target absent: not scored
                     [0, 0, 0, 7]])       # zero size: the previous prediction (IoU 0.5)
    r = evaluate_results([seq], {"s": pred})
    # pytracking: frames 0, 1, 3 count, IoUs 1, 0.5, 0.5 -> success(t) = 1 below 0.5, then 1/3
    expected = np.where(tracking.OVERLAP_THRESHOLDS < 0.5, 1.0, 1 / 3)
    expected[-1] = 0
    np.testing.assert_allclose(r["success_curve"], expected, atol=1e-12)
    assert r["auc"] == pytest.approx(expected.mean()) and r["op50"] == pytest.approx(1 / 3)
    # GOT-10k: frame 0 out, absent frame out: IoUs 0.5, 0.5
    assert r["ao"] == pytest.approx(0.5) and r["sr50"] == 0 and r["sr75"] == 0
    # centre errors 2.5 px (<= 20), normalised 0.25 (> 0.20)
    assert r["precision"] == 1 and r["normalized_precision"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no predictions"):
        evaluate_results([seq], {})
    with pytest.raises(ValueError, match=r"sequence 's': predictions of shape \(3, 4\)"):
        evaluate_results([seq], {"s": pred[:3]})


def test_ao_pools_frames_over_sequences():
    one = Sequence("one", ("a",) * 3, np.array([[0, 0, 10, 10]] * 3, np.float32), np.zeros(3, bool))
    two = Sequence("two", ("a",) * 2, np.array([[0, 0, 10, 10]] * 2, np.float32), np.zeros(2, bool))
    r = evaluate_results([one, two], {"one": [[0, 0, 10, 10]] * 3,
                                      "two": [[0, 0, 10, 10], [0, 0, 10, 5]]})
    # pooled frames 1..: IoUs 1, 1, 0.5 -> 2.5 / 3 (the per-sequence mean would be 0.75)
    assert r["ao"] == pytest.approx(2.5 / 3)
    assert r["per_sequence"]["two"]["ao"] == pytest.approx(0.5)


def test_success_plot_is_a_png(tmp_path):
    curves = {"perfect": success_curve(np.ones(5)), "still": success_curve([0.2, 0.6, 0.0])}
    for backend in ("pil", "auto"):
        path = success_plot(curves, str(tmp_path / f"{backend}.png"), backend=backend)
        with Image.open(path) as im:
            assert im.format == "PNG"
            px = np.asarray(im.convert("RGB")).reshape(-1, 3)
        # both curves drawn (the first two palette colours)
        assert (px == (31, 119, 180)).all(1).sum() > 100
        assert (px == (255, 127, 14)).all(1).sum() > 50
    assert sorted(os.listdir(tmp_path)) == ["auto.png", "pil.png"]


# ----------------------------------------------------------------------------- result files
def test_result_files_round_trip(tmp_path):
    boxes = np.array([[1.5, 2.25, 30.0, 40.125], [0.0, -3.0, 1e3, 7.0001]])
    path = write_result(str(tmp_path / "sub" / "seq.txt"), boxes)
    assert open(path).read() == "1.5000,2.2500,30.0000,40.1250\n0.0000,-3.0000,1000.0000,7.0001\n"
    np.testing.assert_allclose(read_result(path), boxes, atol=5e-5)
    (tmp_path / "tabs.txt").write_text("1\t2\t3\t4\n5 6 7 8\n")
    np.testing.assert_array_equal(read_result(str(tmp_path / "tabs.txt")),
                                  [[1, 2, 3, 4], [5, 6, 7, 8]])
    (tmp_path / "bad.txt").write_text("1,2,3,4\n1,2,3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        read_result(str(tmp_path / "bad.txt"))


def test_a_failing_result_write_leaves_no_file(tmp_path, monkeypatch):
    real = tracking._format_row
    calls = []

    def failing(box):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(box)
    monkeypatch.setattr(tracking, "_format_row", failing)
    path = str(tmp_path / "seq.txt")
    with pytest.raises(OSError, match="disk full"):
        write_result(path, np.ones((5, 4)))
    assert os.listdir(tmp_path) == []  # neither the result nor a temporary file
    monkeypatch.setattr(tracking, "_format_row", real)
    write_result(path, np.ones((2, 4)))
    monkeypatch.setattr(tracking, "_format_row", failing)
    calls.clear()
    with pytest.raises(OSError):
        write_result(path, np.zeros((5, 4)))
    np.testing.assert_array_equal(read_result(path), np.ones((2, 4)))  # the old file, intact
    assert os.listdir(tmp_path) == ["seq.txt"]
    with pytest.raises(ValueError, match="finite"):
        write_result(path, [[0, 0, np.nan, 1]])
