"""COCO-format detection data and evaluation (the DETR family): loader, augmentation, shapes
scenes written as COCO, and COCO mAP with pycocotools.

Example contract (after transforms; every array has a fixed shape, so examples stack):

    "image":     float32 [S, S, 3] in [-1, 1]: the image resized and placed at the top-left of
                 an S x S canvas; padding = 0
    "pad_mask":  bool [S, S], True = real image pixel
    "boxes":     float32 [M, 4] (cx, cy, w, h) normalised by the canvas side S; zero rows pad
    "labels":    int32 [M], contiguous class index 0..K-1 (the COCO category ids sorted
                 ascending -> 0..K-1, see `read_categories`); 0 for padding
    "box_mask":  bool [M], True = real object; objects beyond M are dropped (the smallest first;
                 `CocoDataset.objects_beyond` counts them and `coco_detection` warns once)
    "image_id":  int32 [], the COCO image id
    "scale":     float32 [], original-image pixels per canvas pixel (eval: canvas x * scale =
                 original x; train: pixels of the crop per canvas pixel)
    "orig_size": int32 [2], (h, w) of the original image
    "id":        int32 [], index of the image in the split's list (the JSON's image order)

Coordinates are pixel-edge (a box [x1, x2) covers columns x1..x2-1, COCO's own convention), and
one scalar `scale` maps a whole image: the resize reads exactly the original region (x0, y0,
x0 + w' * scale, y0 + h' * scale) into the w' x h' canvas pixels (PIL `resize(box=...)`), so
canvas x = (original x - x0) / scale holds for the pixels and the boxes alike. The canvas
side of the short edge is rounded down (PIL cannot read past the image), which drops less than
one canvas pixel of the image; boxes are clipped to the region that is shown.

Splits (`coco_detection`): "eval" resizes the long side to S, no augmentation, in JSON order.
"train" is shuffled by seed, repeated forever, and augmented as DETR / Plain DETR's recipe
scaled to one S x S canvas: with probability 1/2 a random crop (each side uniform in
[CROP_SIDE, 1] x the image's, positioned uniformly; up to _CROP_TRIES draws to find one in
which at least one box keeps a part, else no crop); a random resize (long side uniform in
LONG_SIDE x S canvas pixels: DETR's 480..800 shorter-side choice is 0.6..1.0 of its largest);
a horizontal flip with probability 1/2. Boxes are clipped to the crop and boxes that vanish
dropped. `augment="flip"` / `"none"` keep the whole image at full canvas size (flipped with
probability 1/2 / never): the tiny shapes scenes converge far faster without crops. The augmentation is drawn by grain's `random_map` placed after `repeat`, whose
generator is seeded by (seed, index in the repeated stream): deterministic per (seed, example,
epoch), different from one epoch to the next.

Loading (`load_coco`) validates the JSON eagerly and raises ConfigError naming the problem:
not a COCO instances file (missing keys), an image file that is missing, an annotation on an
unknown image id or with an unknown category id, a box outside its image (beyond a 1-pixel
tolerance) or with a negative size. Zero-size boxes are skipped with one warning rather than
refused: COCO train2017 itself has two (height 0, annotations 918 and 2206849). Crowd
annotations (iscrowd=1) are not training targets (COCOeval still uses them); images without
annotations are kept. Images are decoded when read; an unreadable file raises ConfigError
naming it.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import grain
import numpy as np

from trainer.config import ConfigError
from trainer.data import BadExample, check_files
from models.images import SHAPE_KINDS, _to_float, draw_scene, image_header

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (COCO boxes are float, rounded)
LONG_SIDE = (0.6, 1.0)  # train: the resized long side, as a fraction of the canvas side S
CROP_SIDE = 0.5  # train: a crop's side is at least this fraction of the image's side
CROP_PROBABILITY = 0.5
FLIP_PROBABILITY = 0.5
_CROP_TRIES = 10

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval 'bbox' stats[0:6]


# ----------------------------------------------------------------------------- the JSON
def _read_json(path: str) -> dict:
    """The parsed instances file, with its three lists present."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"COCO: annotation file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"COCO: cannot read annotation file {path!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"COCO: {path!r} is not a COCO instances file: its top level is a "
                          f"{type(data).__name__}, not an object with 'images', 'annotations' "
                          f"and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ConfigError(f"COCO: {path!r} is not a COCO instances file: it has no "
                          f"{', '.join(map(repr, missing))} key (has {sorted(data)})")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise ConfigError(f"COCO: {path!r}: {k!r} must be a list, got "
                              f"{type(data[k]).__name__}")
    return data


def _field(entry: Any, key: str, what: str, path: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise ConfigError(f"COCO: {what} in {path!r} has no {key!r} field: {entry!r:.200}")
    return entry[key]


def _int(value: Any, key: str, what: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"COCO: {what} in {path!r}: {key!r} must be an integer, got {value!r}")
    return int(value)


def _categories(data: dict, path: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    names: dict[int, str] = {}
    for c in data["categories"]:
        cid = _int(_field(c, "id", "a category", path), "id", "a category", path)
        if cid in names:
            raise ConfigError(f"COCO: category id {cid} appears twice in {path!r}")
        names[cid] = str(c.get("name", cid))
    if not names:
        raise ConfigError(f"COCO: {path!r} has no categories")
    ids = tuple(sorted(names))
    return ids, tuple(names[i] for i in ids)


def read_categories(annotation_json: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(COCO category ids sorted ascending, their names): contiguous label k is category
    ids[k]. Reads the whole JSON; a Task that also loads the data can use
    `CocoDataset.category_ids` instead."""
    return _categories(_read_json(annotation_json), annotation_json)


def num_classes(annotation_json: str) -> int:
    """K, the number of categories (contiguous labels 0..K-1)."""
    return len(read_categories(annotation_json)[0])


@dataclass(frozen=True)
class CocoDataset:
    """A validated COCO instances file. Image i (JSON order) is `files[i]`, of size
    `sizes[i]` = (h, w), with training targets `boxes[i]` float32 [n_i, 4] (x1, y1, x2, y2) in
    original pixels and `labels[i]` int32 [n_i] (contiguous), crowd and zero-size annotations
    excluded."""
    annotation_json: str
    image_dir: str
    image_ids: np.ndarray  # int64 [I]
    files: tuple[str, ...]
    sizes: np.ndarray  # int32 [I, 2] (h, w)
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    num_crowd: int
    zero_size: tuple[int, ...]  # ids of the zero-size annotations that were skipped

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def subset(self, keep: Sequence[int]) -> "CocoDataset":
        """The images `keep` (indices, in order) with their targets."""
        keep = list(keep)
        return replace(self, image_ids=self.image_ids[keep], sizes=self.sizes[keep],
                       files=tuple(self.files[k] for k in keep),
                       boxes=tuple(self.boxes[k] for k in keep),
                       labels=tuple(self.labels[k] for k in keep))

    def objects_beyond(self, max_objects: int) -> int:
        """How many training targets do not fit in max_objects rows (summed over images; a
        train crop can only lower an image's count)."""
        return int(sum(max(0, len(b) - max_objects) for b in self.boxes))


def load_coco(annotation_json: str, image_dir: str) -> CocoDataset:
    """Parse and validate a COCO instances file whose images are image_dir/<file_name>."""
    path = annotation_json
    data = _read_json(path)
    category_ids, category_names = _categories(data, path)
    label_of = {c: k for k, c in enumerate(category_ids)}
    index: dict[int, int] = {}
    image_ids, files, sizes = [], [], []
    for e in data["images"]:
        iid = _int(_field(e, "id", "an image entry", path), "id", "an image entry", path)
        what = f"image {iid}"
        name = _field(e, "file_name", what, path)
        w = _int(_field(e, "width", what, path), "width", what, path)
        h = _int(_field(e, "height", what, path), "height", what, path)
        if w < 1 or h < 1:
            raise ConfigError(f"COCO: {what} ({name!r}) in {path!r} has size {w}x{h}")
        if iid in index:
            raise ConfigError(f"COCO: image id {iid} appears twice in {path!r}")
        if not -2**31 <= iid < 2**31:
            raise ConfigError(f"COCO: image id {iid} in {path!r} does not fit in int32")
        index[iid] = len(files)
        image_ids.append(iid)
        files.append(os.path.join(image_dir, str(name)))
        sizes.append((h, w))
    if not files:
        raise ConfigError(f"COCO: {path!r} lists no images")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ConfigError(f"COCO: {len(missing)} of the {len(files)} image files listed in "
                          f"{path!r} do not exist: {', '.join(map(repr, missing[:5]))}"
                          f"{' ...' if len(missing) > 5 else ''}")
    boxes: list[list] = [[] for _ in files]
    labels: list[list] = [[] for _ in files]
    num_crowd, zero_size = 0, []
    for a in data["annotations"]:
        aid = _field(a, "id", "an annotation", path)
        iid = _field(a, "image_id", f"annotation {aid}", path)
        if iid not in index:
            raise ConfigError(f"COCO: annotation {aid} in {path!r} refers to image id {iid!r}, "
                              f"which is not among the file's images")
        k = index[iid]
        cid = _field(a, "category_id", f"annotation {aid}", path)
        if cid not in label_of:
            raise ConfigError(f"COCO: annotation {aid} (image {files[k]!r}) in {path!r} has "
                              f"category id {cid!r}, which is not among the categories "
                              f"{list(category_ids)}")
        bbox = _field(a, "bbox", f"annotation {aid}", path)
        try:
            x, y, bw, bh = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise ConfigError(f"COCO: annotation {aid} (image {files[k]!r}) in {path!r}: bbox "
                              f"{bbox!r} is not four numbers [x, y, width, height]") from None
        h, w = sizes[k]
        if not all(map(math.isfinite, (x, y, bw, bh))) or bw < 0 or bh < 0:
            raise ConfigError(f"COCO: annotation {aid} (image {files[k]!r}) in {path!r}: bbox "
                              f"[x, y, width, height] = {bbox} has a negative or non-finite size")
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + bw > w + t or y + bh > h + t:
            raise ConfigError(f"COCO: annotation {aid} (image {files[k]!r}) in {path!r}: bbox "
                              f"[x, y, width, height] = {bbox} lies outside the {w}x{h} image")
        if a.get("iscrowd", 0):
            num_crowd += 1
        elif bw == 0 or bh == 0:
            zero_size.append(aid)
        else:
            boxes[k].append((x, y, x + bw, y + bh))
            labels[k].append(label_of[cid])
    if zero_size:
        warnings.warn(f"COCO: {path!r}: {len(zero_size)} annotations with a zero-size box are "
                      f"not used as training targets (ids {zero_size[:5]})", stacklevel=2)
    return CocoDataset(
        annotation_json=path, image_dir=image_dir, image_ids=np.array(image_ids, np.int64),
        files=tuple(files), sizes=np.array(sizes, np.int32).reshape(-1, 2),
        boxes=tuple(np.array(b, np.float32).reshape(-1, 4) for b in boxes),
        labels=tuple(np.array(lab, np.int32) for lab in labels),
        category_ids=category_ids, category_names=category_names, num_crowd=num_crowd,
        zero_size=tuple(zero_size))


# ----------------------------------------------------------------------------- examples
class _CocoRecords:
    """Random-access source of per-image records; decoding happens in the map after it, so the
    train augmentation is drawn per (seed, index) by grain's random_map."""

    def __init__(self, data: CocoDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        i = int(i)
        d = self.data
        return {"path": d.files[i], "boxes": d.boxes[i], "labels": d.labels[i],
                "image_id": np.int32(d.image_ids[i]), "orig_size": d.sizes[i], "id": np.int32(i)}

    def _getitems(self, indices):
        """Batched read (grain's SupportsBatchedReadRandomAccessDataSource)."""
        return [self[i] for i in indices]


def _decode(path: str, orig_size: np.ndarray, draft: int):
    """(RGB PIL image, k): the file decoded at 1/k of its resolution (JPEG DCT scaling picks
    k in {1, 2, 4, 8} keeping both sides >= draft px; other formats k = 1)."""
    from PIL import Image
    h, w = (int(v) for v in orig_size)
    try:
        with Image.open(path) as im:
            if im.size != (w, h):
                raise BadExample(path, f"COCO: image file {path!r} is {im.size[0]}x"
                                 f"{im.size[1]} pixels, the annotation file says {w}x{h}")
            drafted = im.draft("RGB", (draft, draft))
            # draft returns the original image's extent inside the reduced one
            k = w / drafted[1][2] if drafted is not None else 1.0
            if im.mode == "P":  # P -> RGB warns for a palette with transparency, via RGBA not
                im = im.convert("RGBA")
            return im.convert("RGB"), k
    except ConfigError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadExample(path, f"COCO: cannot decode image file {path!r}: {e}") from None


def _example(x: dict, size: int, max_objects: int, region: tuple[int, int, int, int],
             long_side: int, flip: bool) -> dict:
    """The example of record x showing `region` (x0, y0, x1, y1) of the original image, its
    long side resized to long_side canvas pixels, optionally flipped."""
    from PIL import Image
    S, M = size, max_objects
    h, w = (int(v) for v in x["orig_size"])
    x0, y0, x1, y1 = region
    scale = max(x1 - x0, y1 - y0) / long_side
    # round down (with slack for the float division) so the region read stays in the image
    nw = min(S, max(1, math.floor((x1 - x0) / scale + 1e-6)))
    nh = min(S, max(1, math.floor((y1 - y0) / scale + 1e-6)))
    rx1, ry1 = min(x0 + nw * scale, w), min(y0 + nh * scale, h)
    im, k = _decode(x["path"], x["orig_size"], 2 * S)
    pixels = np.asarray(im.resize((nw, nh), Image.BILINEAR, box=(x0 / k, y0 / k, rx1 / k,
                                                                   ry1 / k)), np.uint8)
    b = (x["boxes"] - np.array([x0, y0, x0, y0], np.float32)) / np.float32(scale)
    b = np.clip(b, 0.0, np.array([nw, nh, nw, nh], np.float32))
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    b, labels = b[keep], x["labels"][keep]
    if flip:
        pixels = pixels[:, ::-1]
        b = np.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], -1)
    if len(b) > M:  # keep the M largest: small objects are the cheapest to lose
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:M])
        b, labels = b[keep], labels[keep]
    n = len(b)
    image = np.zeros((S, S, 3), np.float32)
    image[:nh, :nw] = _to_float(pixels)
    pad_mask = np.zeros((S, S), bool)
    pad_mask[:nh, :nw] = True
    boxes = np.zeros((M, 4), np.float32)
    boxes[:n] = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                          b[:, 3] - b[:, 1]], -1) / S
    out_labels = np.zeros(M, np.int32)
    out_labels[:n] = labels
    box_mask = np.arange(M) < n
    return {"image": image, "pad_mask": pad_mask, "boxes": boxes, "labels": out_labels,
            "box_mask": box_mask, "image_id": x["image_id"], "scale": np.float32(scale),
            "orig_size": np.asarray(x["orig_size"], np.int32), "id": x["id"]}


class _EvalTransform(grain.transforms.Map):
    """The whole image, long side resized to S."""

    def __init__(self, size: int, max_objects: int):
        self.size, self.max_objects = size, max_objects

    def map(self, x):
        h, w = (int(v) for v in x["orig_size"])
        return _example(x, self.size, self.max_objects, (0, 0, w, h), self.size, False)


def _keeps_a_box(boxes: np.ndarray, region: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = region
    return bool(np.any((np.minimum(boxes[:, 2], x1) > np.maximum(boxes[:, 0], x0))
                       & (np.minimum(boxes[:, 3], y1) > np.maximum(boxes[:, 1], y0))))


# the train split's augmentation (coco_detection(augment=...)): "detr" = the module docstring's
# recipe (crop branch, resize of the long side, flip); "flip" = the whole image at full canvas
# size, flipped with probability 1/2; "none" = the whole image
AUGMENTS = ("detr", "flip", "none")


class _TrainTransform(grain.transforms.RandomMap):
    """The train augmentation `augment` (AUGMENTS; "detr": DETR's random crop branch,
    multi-scale resize and flip, see the module docstring)."""

    def __init__(self, size: int, max_objects: int, augment: str = "detr"):
        self.size, self.max_objects, self.augment = size, max_objects, augment

    def random_map(self, x, rng: np.random.Generator):
        h, w = (int(v) for v in x["orig_size"])
        region = (0, 0, w, h)
        if self.augment != "detr":
            flip = self.augment == "flip" and bool(rng.uniform() < FLIP_PROBABILITY)
            return _example(x, self.size, self.max_objects, region, self.size, flip)
        if rng.uniform() < CROP_PROBABILITY:
            for _ in range(_CROP_TRIES):
                cw = int(rng.integers(max(1, math.ceil(CROP_SIDE * w)), w + 1))
                ch = int(rng.integers(max(1, math.ceil(CROP_SIDE * h)), h + 1))
                cx, cy = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = (cx, cy, cx + cw, cy + ch)
                if not len(x["boxes"]) or _keeps_a_box(x["boxes"], crop):
                    region = crop
                    break
        lo = max(1, math.ceil(LONG_SIDE[0] * self.size))
        long_side = int(rng.integers(lo, max(lo, math.floor(LONG_SIDE[1] * self.size)) + 1))
        flip = bool(rng.uniform() < FLIP_PROBABILITY)
        return _example(x, self.size, self.max_objects, region, long_side, flip)


def coco_detection(annotation_json: str, image_dir: str, split: str, *, image_size: int,
                   max_objects: int, seed: int = 0, augment: str = "detr",
                   skip_bad: bool = False) -> grain.MapDataset:
    """The examples of the module docstring for one COCO instances file.

    "train": shuffled by seed, repeated forever, augmented per (seed, example, epoch) as
    `augment` says (AUGMENTS);
    "eval": finite, in the JSON's image order, long side resized to image_size. The JSON is
    validated now (`load_coco`), and every image's header against its annotated size
    (trainer.data.check_files: unreadable images listed at once in a ConfigError, or left out
    with a warning when skip_bad); images are decoded when read (BadExample naming a file that
    still fails)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if image_size < 1 or max_objects < 1:
        raise ConfigError(f"COCO: image_size ({image_size}) and max_objects ({max_objects}) "
                          f"must be positive")
    if augment not in AUGMENTS:
        raise ConfigError(f"COCO: augment={augment!r}; allowed: {', '.join(AUGMENTS)}")
    data = load_coco(annotation_json, image_dir)
    expected = {f: (int(w), int(h)) for f, (h, w) in zip(data.files, data.sizes)}

    def header(path):
        size = image_header(path)
        if size != expected[path]:
            raise ValueError(f"{size} pixels, the annotation file says {expected[path]}")

    keep = check_files(list(data.files), header, what=f"images of {annotation_json!r}",
                       skip_bad=skip_bad)
    if not keep:
        raise ConfigError(f"COCO: none of the {len(data)} images of {annotation_json!r} can be "
                          "read")
    if len(keep) < len(data):
        data = data.subset(keep)
    over = data.objects_beyond(max_objects)
    if over:
        crowded = sum(len(b) > max_objects for b in data.boxes)
        warnings.warn(f"COCO: {crowded} images in {annotation_json!r} have more than "
                      f"max_objects={max_objects} objects: {over} objects will be dropped "
                      f"(the smallest of each image)", stacklevel=2)
    ds = grain.MapDataset.source(_CocoRecords(data))
    if split == "train":
        return ds.shuffle(seed=seed).repeat(None).random_map(
            _TrainTransform(image_size, max_objects, augment), seed=seed)
    return ds.map(_EvalTransform(image_size, max_objects))


# ----------------------------------------------------------------------------- shapes as COCO
def _atomic_write(path: str, write) -> None:
    """write(tmp_path), then rename: a reader never sees a half-written file, and processes
    writing the same file at once do not interleave."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _already_written(json_path: str, image_dir: str, params: dict) -> bool:
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("info", {}).get("generator") != params:
        return False
    return all(os.path.isfile(os.path.join(image_dir, e["file_name"]))
               for e in data.get("images", []))


def write_shapes_coco(root: str, *, num_train: int, num_eval: int, image_size: int = 64,
                      min_shapes: int = 1, max_shapes: int = 3,
                      kinds: Sequence[str] = ("square", "circle"), noise: float = 0.1,
                      seed: int = 0) -> dict[str, str]:
    """The embedded detection data: shapes scenes written as a real COCO layout, read back with
    the same loader as real data.

    Writes root/train/NNNNNN.png, root/val/NNNNNN.png, root/annotations/instances_train.json
    and instances_val.json. Image i of a split (id i + 1) is `draw_scene(np.random.default_rng(
    (4, seed, stream, i)), image_size, min_shapes=..., max_shapes=..., noise=..., kinds=kinds)`
    with stream 0 for train and 1 for eval; category j + 1 is kinds[j]; a bbox is the scene's
    box as [x, y, width, height] in pixels, its area the shape's visible pixel count.
    Idempotent: a split whose JSON records the same parameters (in "info") and whose images
    all exist is not rewritten.

    Returns {"train_annotations", "train_images", "eval_annotations", "eval_images"}: paths for
    `coco_detection(paths[f"{split}_annotations"], paths[f"{split}_images"], split, ...)`.
    """
    if num_train < 1 or num_eval < 1:
        raise ConfigError(f"write_shapes_coco: num_train ({num_train}) and num_eval "
                          f"({num_eval}) must be at least 1")
    kinds = list(kinds)
    params = dict(num_train=num_train, num_eval=num_eval, image_size=image_size,
                  min_shapes=min_shapes, max_shapes=max_shapes, kinds=kinds, noise=float(noise),
                  seed=seed)
    paths = {"train_annotations": os.path.join(root, "annotations", "instances_train.json"),
             "train_images": os.path.join(root, "train"),
             "eval_annotations": os.path.join(root, "annotations", "instances_val.json"),
             "eval_images": os.path.join(root, "val")}
    categories = [{"id": j + 1, "name": k, "supercategory": "shape"} for j, k in enumerate(kinds)]
    for stream, (split, n) in enumerate((("train", num_train), ("eval", num_eval))):
        json_path, image_dir = paths[f"{split}_annotations"], paths[f"{split}_images"]
        split_params = dict(params, split=split)
        if _already_written(json_path, image_dir, split_params):
            continue
        from PIL import Image
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            scene = draw_scene(np.random.default_rng((4, seed, stream, i)), image_size,
                               min_shapes=min_shapes, max_shapes=max_shapes, noise=noise,
                               kinds=kinds)
            name = f"{i:06d}.png"
            _atomic_write(os.path.join(image_dir, name),
                          lambda p, img=scene["image"]: Image.fromarray(img).save(p, "PNG"))
            images.append({"id": i + 1, "file_name": name, "width": image_size,
                           "height": image_size})
            for (x1, y1, x2, y2), c, area in zip(scene["boxes"].tolist(),
                                                 scene["classes"].tolist(),
                                                 scene["areas"].tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": kinds.index(SHAPE_KINDS[c]) + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area,
                                    "iscrowd": 0})
        data = {"info": {"description": "polyformer shapes scenes (models.detr.coco)",
                         "generator": split_params},
                "images": images, "annotations": annotations, "categories": categories}

        def write_json(p, data=data):
            with open(p, "w", encoding="utf-8") as f:
                json.dump(data, f)
        _atomic_write(json_path, write_json)  # last: its presence marks the split complete
    return paths


# ----------------------------------------------------------------------------- evaluation
def coco_ground_truth(annotation_json: str):
    """pycocotools `COCO` of an instances file, loaded quietly; annotations without "area" or
    "iscrowd" (optional for the loader, required by COCOeval) get w * h and 0."""
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotation_json)
    for a in gt.dataset["annotations"]:  # the same dicts as gt.anns
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    return gt


def coco_evaluate(ground_truth, detections: Sequence[dict], *,
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO box mAP: {"AP", "AP50", "AP75", "APs", "APm", "APl"} (COCOeval 'bbox' stats[0:6]).

    image_ids: evaluate on these images only (an evaluation that covered part of the split);
    None: every image of the ground truth.

    ground_truth: an instances JSON path or a `coco_ground_truth` COCO (reuse it across
    evaluations of a large file). detections: [{"image_id", "category_id" (COCO id), "bbox"
    [x, y, w, h] in original pixels, "score"}]; at most 100 per image and category count
    (COCOeval's maxDets). No detections -> every key 0.0. COCOeval reports -1 for an area range
    without ground-truth objects (e.g. APm, APl on 64 x 64 shapes, all "small")."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = ground_truth if isinstance(ground_truth, COCO) else coco_ground_truth(ground_truth)
    if not len(detections):
        return dict.fromkeys(AP_KEYS, 0.0)
    dets = [{"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
             "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])}
            for d in detections]  # copies: loadRes adds fields to the dicts it gets
    unknown = sorted({d["image_id"] for d in dets} - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"coco_evaluate: detections for image ids {unknown[:5]} that the "
                         f"ground truth does not have")
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(AP_KEYS, ev.stats[:6])}


def to_coco_detections(image_ids, scores, labels, boxes_xyxy, scale, category_ids, *,
                       image_size: int, orig_size) -> list[dict]:
    """Model outputs on the canvas -> COCO detections in original pixels (eval examples).

    image_ids int [B]; scores float [B, k]; labels int [B, k] contiguous; boxes_xyxy float
    [B, k, 4] (x1, y1, x2, y2) normalised by the canvas side image_size; scale float [B] and
    orig_size int [B, 2] (h, w) from the examples; category_ids: contiguous label -> COCO id
    (`CocoDataset.category_ids`). Original x = x * image_size * scale, clipped to the image."""
    image_ids = np.asarray(image_ids).reshape(-1)
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    boxes = np.asarray(boxes_xyxy, np.float64)
    scale = np.asarray(scale, np.float64).reshape(-1)
    orig = np.asarray(orig_size, np.float64).reshape(-1, 2)
    cats = np.asarray(category_ids)
    if labels.size and (labels.min() < 0 or labels.max() >= len(cats)):
        raise ValueError(f"to_coco_detections: labels outside 0..{len(cats) - 1}")
    px = boxes * (image_size * scale)[:, None, None]
    hi = np.stack([orig[:, 1], orig[:, 0], orig[:, 1], orig[:, 0]], -1)[:, None, :]
    px = np.clip(px, 0.0, hi)
    xywh = np.concatenate([px[..., :2], px[..., 2:] - px[..., :2]], -1)
    B, k = scores.shape
    ids = np.broadcast_to(image_ids[:, None], (B, k)).reshape(-1).tolist()
    return [{"image_id": int(i), "category_id": int(c), "bbox": bb, "score": s}
            for i, c, bb, s in zip(ids, cats[labels.reshape(-1)].tolist(),
                                   xywh.reshape(-1, 4).tolist(), scores.reshape(-1).tolist())]
