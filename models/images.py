"""Image data for the vision families: procedurally drawn shapes (no download) and ImageFolder.

One shapes generator serves three tasks, so their data share one look and one set of guarantees:

- classification (ViT, iFormer): `ShapesClassification` / `shapes_classification`, the label is
  the kind of the scene's main shape;
- detection (DETR): `draw_scene(..., max_shapes=K)` returns every shape's box, class and area;
- tracking (MixFormer): `draw_sequence` moves a textured target among distractor shapes and
  returns its box in every frame.

A scene is a textured background (a random base colour plus, scaled by `noise`, a colour
gradient, two low-frequency waves and per-pixel Gaussian noise) with flat-coloured shapes on top.
Every shape is defined inside a disc of radius r around its centre, so a shape placed with its
centre at least r from the borders is never clipped. Shapes are rasterised with numpy as hard
masks over pixel centres (no anti-aliasing: every pixel belongs to exactly one shape or to the
background, so boxes and areas are exact). Colours are kept apart (RGB distance >= 0.5 from the
background's base colour, >= 0.3 between shapes) so shapes stay distinguishable under noise.

Boxes are (x1, y1, x2, y2) in pixel-edge coordinates: pixel (row y, column x) covers
[x, x+1) x [y, y+1), so a box is the tight box of a shape's pixels with x2 = last column + 1
(width = x2 - x1 pixels), which also keeps it inside [0, S].

Determinism: every example is drawn from its own generator, `np.random.default_rng((stream,
seed, index))`, so example i is the same whatever the order of reads, the worker process or the
number of processes. ImageFolder augmentation uses grain's `random_map` placed after `repeat`,
whose generator is seeded by (seed, index in the repeated stream): deterministic per (seed,
example, epoch), and different from one epoch to the next.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Sequence

import grain
import numpy as np

from trainer.config import ConfigError
from trainer.data import BadExample, check_files

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "diamond", "star",
                                "hexagon")
NUM_SHAPE_CLASSES = len(SHAPE_KINDS)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


# ----------------------------------------------------------------------------- rasterising
def _regular_polygon(n: int, phase: float = math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], -1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = math.pi / 2 + math.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], -1)


# Outlines in the unit disc (x right, y down; the scene's rotation is applied to the pixels).
_POLYGONS = {
    "square": np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]]),
    "triangle": _regular_polygon(3),
    # a rhombus, so that no rotation of the square is a diamond
    "diamond": np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]]),
    "star": _star(),
    "hexagon": _regular_polygon(6, 0.0),
}
_ROTATES = {"square", "triangle", "cross", "diamond", "star", "hexagon"}  # circle and ring do not


def _polygon_edges(verts: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Non-horizontal edges as (y0, y1, x0, dx/dy) for the even-odd crossing test."""
    out = []
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0)):
        if y0 != y1:
            out.append((float(y0), float(y1), float(x0), float((x1 - x0) / (y1 - y0))))
    return out


_EDGES = {k: _polygon_edges(v) for k, v in _POLYGONS.items()}


def _unit_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) of the shape's own frame (unit disc) are inside the shape."""
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.5 ** 2)
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for y0, y1, x0, slope in _EDGES[kind]:
        # even-odd rule: toggle where a ray to the right from (u, v) crosses this edge
        inside ^= ((y0 > v) != (y1 > v)) & (u < x0 + (v - y0) * slope)
    return inside


def _shape_pixels(kind: str, size: int, cx: float, cy: float, r: float, angle: float
                  ) -> tuple[np.ndarray, tuple[slice, slice], np.ndarray, np.ndarray]:
    """The shape's mask over the window of the image around its disc.

    Returns (mask bool [h, w], (row slice, column slice) of the window, u [1|h, w], v [h, w]):
    u and v are the window pixels' coordinates in the shape's own frame (used by textures)."""
    x0, x1 = max(0, int(math.floor(cx - r))), min(size, int(math.ceil(cx + r)) + 1)
    y0, y1 = max(0, int(math.floor(cy - r))), min(size, int(math.ceil(cy + r)) + 1)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :] / r
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None] / r
    if kind in _ROTATES:
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, c * dy - s * dx
    else:
        u, v = np.broadcast_to(dx, (y1 - y0, x1 - x0)), np.broadcast_to(dy, (y1 - y0, x1 - x0))
    return _unit_mask(kind, u, v), (slice(y0, y1), slice(x0, x1)), u, v


def _full_mask(size: int, window_mask: np.ndarray, window: tuple[slice, slice]) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[window] = window_mask
    return m


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) of a non-empty mask [S, S], pixel-edge coordinates."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


# ----------------------------------------------------------------------------- colours, background
def _colour(rng: np.random.Generator, avoid: Sequence[np.ndarray], far: Sequence[float]
            ) -> np.ndarray:
    """A random RGB colour in [0, 1] at least far[j] from avoid[j] (rejection sampling; the
    fallback, the cube corner farthest from avoid[0], is >= sqrt(3)/2 from it)."""
    for _ in range(64):
        c = rng.uniform(0.0, 1.0, 3)
        if all(np.linalg.norm(c - a) >= f for a, f in zip(avoid, far)):
            return c
    return (avoid[0] < 0.5).astype(np.float64)


def _background(rng: np.random.Generator, size: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [S, S, 3] in [0, 1] before pixel noise, base colour [3]).

    With noise == 0 the background is exactly the base colour, so a shape's pixels are exactly
    the pixels that differ from it."""
    base = rng.uniform(0.0, 1.0, 3)
    bg = np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy()
    if noise > 0:
        t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        a = rng.uniform(0, 2 * math.pi)
        ramp = math.cos(a) * t[None, :] + math.sin(a) * t[:, None]  # [S, S], in [-0.71, 0.71]
        bg += 2 * noise * ramp[..., None] * rng.uniform(-1, 1, 3).astype(np.float32)
        for _ in range(2):  # low-frequency waves: texture that is not a shape
            f, a, ph = rng.uniform(1, 4), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
            along = math.cos(a) * t[None, :] + math.sin(a) * t[:, None]
            wave = np.sin(2 * math.pi * f * along + ph)
            bg += noise * wave[..., None] * rng.uniform(-1, 1, 3).astype(np.float32)
    return bg, base


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    if noise > 0:
        img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _kind_ids(kinds: Sequence[str]) -> np.ndarray:
    bad = [k for k in kinds if k not in SHAPE_KINDS]
    if bad or not kinds:
        raise ConfigError(f"shape kinds {bad or list(kinds)} are not among {SHAPE_KINDS}")
    return np.array([SHAPE_KINDS.index(k) for k in kinds], np.int32)


def _check_size(image_size: int) -> None:
    if image_size < 8:
        raise ConfigError(f"image_size={image_size}: shapes need at least 8 x 8 pixels")


# ----------------------------------------------------------------------------- scenes
_PLACE_TRIES = 30
_MIN_VISIBLE = 0.5  # a shape drawn later may hide at most half of an earlier one


def draw_scene(rng: np.random.Generator, image_size: int, *, min_shapes: int = 1,
               max_shapes: int = 1, noise: float = 0.1,
               kinds: Sequence[str] = SHAPE_KINDS) -> dict[str, np.ndarray]:
    """A scene of N in [min_shapes, max_shapes] shapes on a textured background.

    Shapes are drawn in order, later ones on top; a placement that would hide more than half
    of an earlier shape is re-drawn (smaller each try). Boxes and areas describe the *visible*
    pixels of each shape (COCO's convention), so with overlaps a box can be smaller than the
    shape's drawn extent. A shape that ends fully hidden (only possible in a scene too crowded to
    place it within the tries) is dropped, so N < min_shapes only in that corner.
    Radii are uniform in [0.18, 0.42] * S / sqrt(N) (at least 3 px); shapes lie fully inside.

    Returns {"image": uint8 [S, S, 3], "boxes": float32 [N, 4] (x1, y1, x2, y2) in pixels,
    "classes": int32 [N] (index into SHAPE_KINDS), "areas": float32 [N] (visible pixel counts)}.
    """
    _check_size(image_size)
    if not 1 <= min_shapes <= max_shapes:
        raise ConfigError(f"need 1 <= min_shapes ({min_shapes}) <= max_shapes ({max_shapes})")
    ids = _kind_ids(kinds)
    S = image_size
    n = int(rng.integers(min_shapes, max_shapes + 1))
    img, base = _background(rng, S, noise)
    rmax = max(3.0, 0.42 * S / math.sqrt(n))
    rmin = min(max(3.0, 0.18 * S / math.sqrt(n)), rmax)
    visible: list[np.ndarray] = []  # current visible mask [S, S] of each placed shape
    drawn: list[float] = []  # each placed shape's full pixel count
    colours: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(n):
        cls = int(ids[rng.integers(len(ids))])
        for t in range(_PLACE_TRIES):
            r = rng.uniform(rmin, max(rmin, rmax * 0.9 ** t))
            r = min(r, S / 2)
            cx, cy = rng.uniform(r, S - r, 2)
            angle = rng.uniform(0, 2 * math.pi)
            m = _full_mask(S, *_shape_pixels(SHAPE_KINDS[cls], S, cx, cy, r, angle)[:2])
            if m.any() and all((vis & ~m).sum() >= _MIN_VISIBLE * d
                               for vis, d in zip(visible, drawn)):
                break
        if not m.any():
            continue
        visible = [vis & ~m for vis in visible]
        visible.append(m)
        drawn.append(float(m.sum()))
        colours.append(_colour(rng, [base] + colours, [0.5] + [0.3] * len(colours)))
        classes.append(cls)
    keep = [k for k, vis in enumerate(visible) if vis.any()]
    for k in keep:
        img[visible[k]] = colours[k]
    return {
        "image": _finish(img, rng, noise),
        "boxes": np.array([_tight_box(visible[k]) for k in keep], np.float32).reshape(-1, 4),
        "classes": np.array([classes[k] for k in keep], np.int32),
        "areas": np.array([visible[k].sum() for k in keep], np.float32),
    }


def main_shape(scene: dict[str, np.ndarray]) -> int:
    """The classification label of a scene: the class of its largest visible shape (the first
    of equal ones); with one shape per image, that shape's class."""
    return int(scene["classes"][int(np.argmax(scene["areas"]))])


# ----------------------------------------------------------------------------- sequences
def draw_sequence(rng: np.random.Generator, image_size: int, num_frames: int, *,
                  num_distractors: int = 1, noise: float = 0.1,
                  max_speed: float = 0.05) -> dict[str, np.ndarray]:
    """A video of a striped target shape moving among `num_distractors` moving shapes.

    Every object moves with a smoothly turning velocity of 0.5..1 x max_speed (a fraction of
    the image size per frame), bounces off the borders (it always stays fully inside), rotates
    slowly and breathes in scale (+-10..25 %). Distractors may be the target's kind and may be
    striped too; each is drawn in front of or behind the target (fixed per sequence). The
    background is fixed per sequence; pixel noise is fresh per frame.

    Returns {"frames": uint8 [F, S, S, 3], "boxes": float32 [F, 4] (x1, y1, x2, y2): the tight
    box of the target's full drawn shape, even where a distractor in front hides part of it,
    "visible": bool [F]: at least half of the target's pixels are not hidden}.
    """
    _check_size(image_size)
    if num_frames < 1 or num_distractors < 0 or max_speed < 0:
        raise ConfigError(f"need num_frames >= 1, num_distractors >= 0, max_speed >= 0 (got "
                          f"{num_frames}, {num_distractors}, {max_speed})")
    S = image_size
    bg, base = _background(rng, S, noise)
    objects, colours = [], []
    for k in range(1 + num_distractors):
        r0 = rng.uniform(0.12, 0.22) * S
        amp = rng.uniform(0.1, 0.25)
        rmax = min(r0 * (1 + amp), S / 2 - 0.5)
        striped = k == 0 or rng.uniform() < 0.5
        cols = []
        for _ in range(2 if striped else 1):
            cols.append(_colour(rng, [base] + colours, [0.5] + [0.3] * len(colours)))
            colours.append(cols[-1])
        objects.append(dict(
            kind=SHAPE_KINDS[rng.integers(NUM_SHAPE_CLASSES)], r0=r0, amp=amp, rmax=rmax,
            period=rng.uniform(12, 40), phase=rng.uniform(0, 2 * math.pi),
            pos=rng.uniform(rmax, S - rmax, 2), speed=rng.uniform(0.5, 1.0) * max_speed * S,
            heading=rng.uniform(0, 2 * math.pi), angle=rng.uniform(0, 2 * math.pi),
            spin=rng.uniform(-0.1, 0.1), stripe=rng.uniform(0.25, 0.5), cols=cols,
            front=k > 0 and rng.uniform() < 0.5))
    behind = [o for o in objects[1:] if not o["front"]]
    order = behind + [objects[0]] + [o for o in objects[1:] if o["front"]]
    frames = np.empty((num_frames, S, S, 3), np.uint8)
    boxes = np.empty((num_frames, 4), np.float32)
    visible = np.empty(num_frames, bool)
    for f in range(num_frames):
        img = bg.copy()
        hidden = np.zeros((S, S), bool)
        for o in order:
            breath = math.sin(2 * math.pi * f / o["period"] + o["phase"])
            r = min(o["r0"] * (1 + o["amp"] * breath), o["rmax"])
            wm, win, u, _ = _shape_pixels(o["kind"], S, o["pos"][0], o["pos"][1], r, o["angle"])
            if len(o["cols"]) == 2:  # stripes across the shape's own u axis turn with it
                a = (np.floor(u / o["stripe"]) % 2 == 0)[..., None]
                fill = np.where(a, o["cols"][0], o["cols"][1]).astype(np.float32)
                fill = np.broadcast_to(fill, wm.shape + (3,))
                img[win][wm] = fill[wm]
            else:
                img[win][wm] = o["cols"][0]
            m = _full_mask(S, wm, win)
            if o is objects[0]:
                target, hidden[:] = m, False
            else:
                hidden |= m
        frames[f] = _finish(img, rng, noise)
        boxes[f] = _tight_box(target)
        visible[f] = (target & ~hidden).sum() >= 0.5 * target.sum()
        for o in objects:  # move: smooth random turn, bounce so the whole disc stays inside
            o["heading"] += rng.normal(0.0, 0.15)
            o["angle"] += o["spin"]
            step = np.array([math.cos(o["heading"]), math.sin(o["heading"])])
            o["pos"] = o["pos"] + o["speed"] * step
            lo, hi = o["rmax"], S - o["rmax"]
            for d in range(2):
                p = o["pos"][d]
                if p < lo or p > hi:  # reflect off the wall, and the heading with it
                    o["pos"][d] = min(max(2 * lo - p if p < lo else 2 * hi - p, lo), hi)
                    o["heading"] = math.pi - o["heading"] if d == 0 else -o["heading"]
    return {"frames": frames, "boxes": boxes, "visible": visible}


# ----------------------------------------------------------------------------- shapes datasets
def _to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


class ShapesClassification:
    """Random-access source of shape images: example i = draw_scene(np.random.default_rng(
    (stream, seed, i)), image_size, max_shapes=max_shapes, noise=noise), labelled by its main
    shape (`main_shape`). `stream` separates splits drawn with the same seed.

    Examples: {"image": float32 [S, S, 3] in [-1, 1], "label": int32 [], "id": int32 [] (= i)}.
    """

    def __init__(self, num_examples: int, image_size: int, *, seed: int, max_shapes: int = 1,
                 noise: float = 0.1, stream: int = 0):
        _check_size(image_size)
        if num_examples < 1:
            raise ConfigError(f"num_examples={num_examples}: need at least one example")
        self.num_examples, self.image_size = num_examples, image_size
        self.seed, self.max_shapes, self.noise, self.stream = seed, max_shapes, noise, stream

    def __len__(self):
        return self.num_examples

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} of {self.num_examples}")
        scene = draw_scene(np.random.default_rng((self.stream, self.seed, i)), self.image_size,
                           max_shapes=self.max_shapes, noise=self.noise)
        return {"image": _to_float(scene["image"]), "label": np.int32(main_shape(scene)),
                "id": np.int32(i)}

    def _getitems(self, indices):
        """Batched read (grain's SupportsBatchedReadRandomAccessDataSource)."""
        return [self[i] for i in indices]


def shapes_classification(split: str, *, image_size: int, num_train: int, num_eval: int,
                          seed: int = 0, max_shapes: int = 1, noise: float = 0.1
                          ) -> grain.MapDataset:
    """The embedded classification data: "train" = num_train examples (stream 0), shuffled by
    seed and repeated forever; "eval" = num_eval other examples (stream 1), finite, in order."""
    if split == "train":
        src = ShapesClassification(num_train, image_size, seed=seed, max_shapes=max_shapes,
                                   noise=noise, stream=0)
        return grain.MapDataset.source(src).shuffle(seed=seed).repeat(None)
    if split == "eval":
        src = ShapesClassification(num_eval, image_size, seed=seed, max_shapes=max_shapes,
                                   noise=noise, stream=1)
        return grain.MapDataset.source(src)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


# ----------------------------------------------------------------------------- ImageFolder
def _image_files(folder: str) -> list[str]:
    """Image files under folder (recursive, sorted, hidden files and folders skipped)."""
    out = []
    for d, dirs, names in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(names)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _class_dirs(folder: str) -> list[str]:
    return sorted(x for x in os.listdir(folder)
                  if not x.startswith(".") and os.path.isdir(os.path.join(folder, x)))


def _scan(folder: str, class_names: list[str] | None = None, *, items=_image_files,
          what: str = "ImageFolder", unit: str = "images"
          ) -> tuple[list[str], list[int], list[str]]:
    """(items, labels, class names) of a class-per-folder tree; class_names fixes the labels
    (an eval folder is labelled by the train folder's classes). items(class folder) lists one
    class's examples (image files; a video family's clip folders), `what` and `unit` name the
    layout and its examples in errors."""
    classes = _class_dirs(folder)
    if not classes:
        raise ConfigError(f"{what}: {folder!r} has no class sub-folders (expected "
                          f"{folder}/<class>/...)")
    names = classes if class_names is None else class_names
    extra = sorted(set(classes) - set(names))
    if extra:
        raise ConfigError(f"{what}: {folder!r} has classes {extra} that the train folder "
                          f"does not have")
    per_class = {c: items(os.path.join(folder, c)) for c in classes}
    if not any(per_class.values()):
        raise ConfigError(f"{what}: no {unit} at all under {folder!r} (image extensions "
                          f"{', '.join(IMAGE_EXTENSIONS)})")
    for c in classes:
        if not per_class[c]:
            raise ConfigError(f"{what}: class folder {os.path.join(folder, c)!r} has no {unit}")
    files, labels = [], []
    for c in classes:
        files += per_class[c]
        labels += [names.index(c)] * len(per_class[c])
    return files, labels, names


def list_image_folder(root: str, split: str, *, eval_fraction: float = 0.1, items=_image_files,
                      what: str = "ImageFolder", unit: str = "images"
                      ) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class_names) of one split of an ImageFolder tree; example i of
    `image_folder(root, split)` is files[i]. Listing only: nothing is decoded.

    Layouts: root/train/<class>/... with root/val/... (or root/eval/...) for the eval split;
    otherwise root/<class>/..., split by a hash of each file's path relative to root (about
    eval_fraction of the files go to eval, the same ones on every machine). items / what /
    unit: `_scan`'s (a video family lists clip folders with the same layouts)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not os.path.isdir(root):
        raise ConfigError(f"{what}: root {root!r} does not exist or is not a directory")
    eval_dir = next((os.path.join(root, d) for d in ("val", "eval")
                     if os.path.isdir(os.path.join(root, d))), None)
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir) and eval_dir:
        kw = dict(items=items, what=what, unit=unit)
        files, labels, names = _scan(train_dir, **kw)
        if split == "eval":
            files, labels, _ = _scan(eval_dir, names, **kw)
        return files, labels, names
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"{what}: eval_fraction={eval_fraction} must be in (0, 1)")
    files, labels, names = _scan(root, items=items, what=what, unit=unit)
    held = [zlib.crc32(os.path.relpath(f, root).replace(os.sep, "/").encode()) % 10_000
            < eval_fraction * 10_000 for f in files]
    keep = [k for k, h in enumerate(held) if h == (split == "eval")]
    if not keep:
        raise ConfigError(f"{what}: the hash split of the {len(files)} {unit} under {root!r} "
                          f"leaves the {split} split empty (eval_fraction={eval_fraction}); add "
                          f"{unit}, change eval_fraction or use {root}/train and {root}/val")
    return [files[k] for k in keep], [labels[k] for k in keep], names


def image_header(path: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it (the up-front pass of
    trainer.data.check_files); raises for a file PIL cannot identify."""
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def _load_rgb(path: str, draft: int):
    """Decode an image as RGB (grey, palette, RGBA, CMYK converted; GIFs: first frame); a file
    that cannot be decoded raises trainer.data.BadExample naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.draft("RGB", (draft, draft))  # JPEG: decode at a reduced scale >= draft px
            if im.mode == "P":  # P -> RGB warns for a palette with transparency, via RGBA not
                im = im.convert("RGBA")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadExample(path, f"cannot decode image file {path!r}: {e}") from None


class PathRecords:
    """Random-access source of (path, label, id) records (image files; the video family's clip
    folders): decoding happens in the map after it, so the train split's crop is chosen per
    (seed, index) by grain's random_map."""

    def __init__(self, files: list[str], labels: list[int]):
        self.files, self.labels = files, labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        i = int(i)
        return {"path": self.files[i], "label": np.int32(self.labels[i]), "id": np.int32(i)}

    def _getitems(self, indices):
        return [self[i] for i in indices]


def _resized(im, size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    from PIL import Image
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), np.uint8)


def centre_box(w: int, h: int) -> tuple[float, float, float, float]:
    """The centre square of a w x h image (resized to S x S: the short side to S, centre crop)."""
    s = min(w, h)
    return ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)


def random_resized_box(w: int, h: int, rng: np.random.Generator,
                       scale: tuple[float, float] = (0.35, 1.0)) -> tuple[int, int, int, int]:
    """Inception-style random resized crop of a w x h image (torchvision's algorithm): area
    scale[0]..scale[1] of the image, aspect 3/4..4/3; after 10 misses the largest centred crop
    within 3/4..4/3. Returns (x0, y0, x1, y1) in pixels."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return (x0, y0, x0 + cw, y0 + ch)
    cw, ch = min(w, round(h * 4 / 3)), min(h, round(w * 4 / 3))
    return ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)


class _EvalTransform(grain.transforms.Map):
    """Resize the short side to S and take the centre S x S (the centre square, resized)."""

    def __init__(self, size: int):
        self.size = size

    def map(self, x):
        im = _load_rgb(x["path"], self.size)
        img = _resized(im, self.size, centre_box(*im.size))
        return {"image": _to_float(img), "label": x["label"], "id": x["id"]}


class _TrainTransform(grain.transforms.RandomMap):
    """Inception-style random resized crop (area 35..100 %, aspect 3/4..4/3, torchvision's
    algorithm: `random_resized_box`), a horizontal flip with probability 1/2, resize to S x S."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.35, 1.0)):
        self.size, self.scale = size, scale

    def random_map(self, x, rng: np.random.Generator):
        # a crop's sides are >= 0.51 x the short side, so a JPEG decoded with short side >= 2S
        # keeps >= S px across the crop
        im = _load_rgb(x["path"], 2 * self.size)
        img = _resized(im, self.size, random_resized_box(*im.size, rng, self.scale))
        if rng.uniform() < 0.5:
            img = img[:, ::-1]
        return {"image": _to_float(img), "label": x["label"], "id": x["id"]}


def image_folder(root: str, split: str, *, image_size: int, seed: int = 0,
                 eval_fraction: float = 0.1, skip_bad: bool = False
                 ) -> tuple[grain.MapDataset, list[str]]:
    """(dataset, class_names) of an ImageFolder tree (layouts: `list_image_folder`).

    The folder structure and every image's header are checked now (trainer.data.check_files:
    the unreadable files listed at once in a ConfigError, or left out with a warning when
    skip_bad); images are decoded when read, and one that still fails raises BadExample naming
    its file. "train": shuffled by seed, repeated
    forever, random-resized-crop + flip, the augmentation drawn per (seed, index in the repeated
    stream), i.e. per example and epoch; "eval": in file order, centre crop.
    Examples: {"image": float32 [S, S, 3] in [-1, 1], "label": int32 [], "id": int32 [] (index
    of the file in the split's list)}.
    """
    if image_size < 1:
        raise ConfigError(f"image_size={image_size} must be positive")
    files, labels, names = list_image_folder(root, split, eval_fraction=eval_fraction)
    keep = check_files(files, image_header, what=f"image files of the {split} split of {root!r}",
                       skip_bad=skip_bad)
    if not keep:
        raise ConfigError(f"ImageFolder: none of the {len(files)} image files of the {split} "
                          f"split of {root!r} can be read")
    files, labels = [files[k] for k in keep], [labels[k] for k in keep]
    ds = grain.MapDataset.source(PathRecords(files, labels))
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat(None).random_map(_TrainTransform(image_size), seed=seed)
    else:
        ds = ds.map(_EvalTransform(image_size))
    return ds, names


def write_image_folder(root: str, *, num_per_class: int, image_size: int, seed: int = 0) -> str:
    """Write num_per_class one-shape PNG images per kind as root/<kind>/<kind>_<i>.png (an
    ImageFolder tree to try the real-format path without data); returns root. ImageFolder
    labels follow the sorted folder names, not SHAPE_KINDS' order."""
    from PIL import Image
    for c, kind in enumerate(SHAPE_KINDS):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(num_per_class):
            scene = draw_scene(np.random.default_rng((2, seed, c, i)), image_size, kinds=(kind,))
            Image.fromarray(scene["image"]).save(os.path.join(root, kind, f"{kind}_{i:05d}.png"))
    return root
