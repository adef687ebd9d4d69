"""Video classification: an image ViT over the frames of a clip, made temporal by STDHA
(ZeroI2V, Li et al. 2024; attention/stdha.py) at zero parameter cost.

Model (`VideoViT`): clips [B, F, S, S, 3] -> the F frames as B * F images, frame-major (frame t
of clip b is image b * F + t, the layout attention/stdha.py shifts along) -> the image ViT of
models/vit.py, whose attention (`model.attention`) sees one frame per sequence -> tokens
[B, F * N, D] and pooled features [B, D], the mean over frames of each frame's pooled
features. With `model.attention=stdha` chosen heads read the keys / values of a neighbouring
frame (`model.stdha_shift`; the layers are built with num_frames = `data.num_frames`); with
`softmax` (or stdha without shifts) every frame is classified on its own and the linear head
averages them: frame averaging, the baseline STDHA has to beat. The parameters are exactly the
image ViT's, so `init_from` an image ViT run (configs/vit.py, or a Hugging Face ViT imported
with trainer.convert) adapts it to video unchanged.

Data. The embedded default is moving shapes (`draw_motion_clip`): one striped shape on a
textured background, classed by its motion (MOTIONS: direction, speed, rotation), never by its
look. Each class has a mirror class whose clips are the same frames in reverse order (left /
right, up / down, cw / ccw; same distribution of frames), so a model blind to frame order,
frame averaging included, is at most 50% accurate, and chance is 1/8. The real format is a
folder of clips, each a folder of frames (`root/<class>/<clip>/<frame>.jpg`, the layout video
datasets are extracted to, e.g. `ffmpeg -i clip.mp4 clip/%05d.jpg`; `root/train` + `root/val`,
or a hash split as ImageFolder's). F frames are sampled TSN-style: the clip cut into F equal
segments, one frame from each (its middle for eval, a random one for train); a clip shorter
than F repeats frames.
"""
from __future__ import annotations

import math
import os
import re

import grain
import jax.numpy as jnp
import numpy as np

from attention.layers import compute_dtype
from attention.registry import layer_config
from models import images
from models.vit import ViT, ViTTask
from trainer.config import ConfigError
from trainer.data import BadExample, check_files
from trainer.task import register_task

# class: (dx, dy) in units of data.speed (a fraction of the image size per frame; x right, y
# down), spin in units of data.spin (radians per frame, positive clockwise on screen). Listed in
# mirror pairs: each class's clips reversed in time are clips of the next / previous one.
MOTIONS: dict[str, tuple[float, float, float]] = {
    "right": (1, 0, 0), "left": (-1, 0, 0),
    "down": (0, 1, 0), "up": (0, -1, 0),
    "right_fast": (2, 0, 0), "left_fast": (-2, 0, 0),
    "spin_cw": (0, 0, 1), "spin_ccw": (0, 0, -1),
}
MOTION_CLASSES = tuple(MOTIONS)
# shapes whose rotation shows (a circle or a ring turning looks the same)
_KINDS = tuple(k for k in images.SHAPE_KINDS if k in images._ROTATES)
_R = (0.2, 0.25)  # the shape's radius, a fraction of the image size


def check_motion(image_size: int, num_frames: int, speed: float) -> None:
    """ConfigError unless the fastest class's path fits inside the image with the largest
    shape (the whole shape stays in view in every frame)."""
    images._check_size(image_size)
    fast = max(math.hypot(dx, dy) for dx, dy, _ in MOTIONS.values())
    travel = fast * speed * (num_frames - 1)
    if num_frames < 2 or speed <= 0 or travel + 2 * _R[1] > 1:
        raise ConfigError(
            f"moving shapes: data.num_frames={num_frames} (>= 2) and data.speed={speed} (> 0) "
            f"must keep the fastest path ({fast:g} x speed x (frames - 1) = {travel:.2f} of the "
            f"image) plus the largest shape ({2 * _R[1]:.2f}) within the image (<= 1)")


def draw_motion_clip(rng: np.random.Generator, image_size: int, num_frames: int, motion: str, *,
                     noise: float = 0.05, speed: float = 0.08, spin: float = math.pi / 8
                     ) -> np.ndarray:
    """A clip of one striped shape moving by `motion` (a MOTIONS name) on a textured background.

    Position p_t = c + v (t - (F - 1) / 2) and angle a_t = a_0 + w (t - (F - 1) / 2): the path
    is symmetric about the middle frame, and everything random (kind, size, colours, stripes,
    centre c, a_0, background) is drawn the same way for every class, so a clip of a class and
    the same generator's clip of its mirror class are the same frames in reverse order (exactly
    with noise=0; per-frame pixel noise is drawn in frame order). Returns uint8 [F, S, S, 3].
    """
    if motion not in MOTIONS:
        raise ConfigError(f"motion {motion!r} is not one of {', '.join(MOTION_CLASSES)}")
    check_motion(image_size, num_frames, speed)
    S, F = image_size, num_frames
    dx, dy, w = MOTIONS[motion]
    bg, base = images._background(rng, S, noise)
    kind = _KINDS[rng.integers(len(_KINDS))]
    r = rng.uniform(*_R) * S
    mid = (F - 1) / 2
    # the centre range keeps the whole path inside; mirror classes have the same |v|, so the
    # same draw gives the same centre
    half = np.abs([dx, dy]) * speed * S * mid
    c = np.array([rng.uniform(r + h, S - r - h) for h in half])
    a0 = rng.uniform(0, 2 * math.pi)
    cols = [images._colour(rng, [base], [0.5])]
    cols.append(images._colour(rng, [base, cols[0]], [0.5, 0.3]))
    stripe = rng.uniform(0.25, 0.5)
    clip = np.empty((F, S, S, 3), np.uint8)
    for t in range(F):
        p = c + np.array([dx, dy]) * speed * S * (t - mid)
        wm, win, u, _ = images._shape_pixels(kind, S, p[0], p[1], r, a0 + w * spin * (t - mid))
        img = bg.copy()
        # stripes across the shape's own u axis turn with it, so its rotation shows
        fill = np.where((np.floor(u / stripe) % 2 == 0)[..., None], cols[0], cols[1])
        img[win][wm] = np.broadcast_to(fill.astype(np.float32), wm.shape + (3,))[wm]
        clip[t] = images._finish(img, rng, noise)
    return clip


class MotionClips:
    """Random-access source of moving-shape clips: example i draws its class and clip from
    np.random.default_rng((stream, seed, i)) (`draw_motion_clip`); `stream` separates splits.
    Examples: {"video": float32 [F, S, S, 3] in [-1, 1], "label": int32 [] (index into
    MOTION_CLASSES), "id": int32 []}."""

    def __init__(self, num_examples: int, image_size: int, num_frames: int, *, seed: int,
                 noise: float = 0.05, speed: float = 0.08, stream: int = 0):
        check_motion(image_size, num_frames, speed)
        if num_examples < 1:
            raise ConfigError(f"num_examples={num_examples}: need at least one example")
        self.num_examples, self.image_size, self.num_frames = num_examples, image_size, num_frames
        self.seed, self.noise, self.speed, self.stream = seed, noise, speed, stream

    def __len__(self):
        return self.num_examples

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} of {self.num_examples}")
        rng = np.random.default_rng((self.stream, self.seed, i))
        label = int(rng.integers(len(MOTION_CLASSES)))
        clip = draw_motion_clip(rng, self.image_size, self.num_frames, MOTION_CLASSES[label],
                                noise=self.noise, speed=self.speed)
        return {"video": images._to_float(clip), "label": np.int32(label), "id": np.int32(i)}

    def _getitems(self, indices):
        return [self[i] for i in indices]


def motion_clips(split: str, *, image_size: int, num_frames: int, num_train: int, num_eval: int,
                 seed: int = 0, noise: float = 0.05, speed: float = 0.08) -> grain.MapDataset:
    """The embedded video data: "train" = num_train clips (stream 0), shuffled by seed and
    repeated forever; "eval" = num_eval other clips (stream 1), finite, in order."""
    kw = dict(seed=seed, noise=noise, speed=speed)
    if split == "train":
        src = MotionClips(num_train, image_size, num_frames, stream=0, **kw)
        return grain.MapDataset.source(src).shuffle(seed=seed).repeat(None)
    if split == "eval":
        return grain.MapDataset.source(MotionClips(num_eval, image_size, num_frames, stream=1,
                                                   **kw))
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


# ----------------------------------------------------------------------------- clip folders
def _natural(name: str):
    """Sort key putting frame_2.jpg before frame_10.jpg (unpadded frame numbers)."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def clip_frames(clip: str) -> list[str]:
    """The frame files of a clip folder (its images, not recursive, natural order)."""
    names = [f for f in os.listdir(clip) if not f.startswith(".")
             and f.lower().endswith(images.IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(clip, f))]
    return [os.path.join(clip, f) for f in sorted(names, key=_natural)]


def _clips(class_dir: str) -> list[str]:
    """The clip folders of one class folder; images lying directly in it are a layout error
    (an ImageFolder tree given to the video family)."""
    entries = sorted(x for x in os.listdir(class_dir) if not x.startswith("."))
    loose = [x for x in entries if x.lower().endswith(images.IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(class_dir, x))]
    if loose:
        raise ConfigError(f"clip folder: {class_dir!r} holds images directly ({loose[0]!r}, ...); "
                          f"expected one folder of frames per clip: <root>/<class>/<clip>/"
                          f"<frame>.jpg")
    return [os.path.join(class_dir, x) for x in entries
            if os.path.isdir(os.path.join(class_dir, x))]


def list_clip_folder(root: str, split: str, *, eval_fraction: float = 0.1
                     ) -> tuple[list[str], list[int], list[str]]:
    """(clip folders, labels, class names) of one split: `images.list_image_folder`'s layouts
    (root/train + root/val, or a hash split of root/<class>/...) with clip folders as the
    examples. Listing only."""
    return images.list_image_folder(root, split, eval_fraction=eval_fraction, items=_clips,
                                    what="clip folder", unit="clips")


def _clip_header(clip: str):
    """The up-front check of one clip: it has frames, and its first and last frames' headers
    read (the others are checked when decoded: a bad one raises BadExample then)."""
    frames = clip_frames(clip)
    if not frames:
        raise ValueError(f"no frames ({', '.join(images.IMAGE_EXTENSIONS)}) in the clip folder")
    images.image_header(frames[0])
    images.image_header(frames[-1])


def frame_indices(n: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """TSN segment sampling: frames 0..n-1 cut into num_frames equal segments, one index from
    each (its middle without rng, uniform within it with one). n < num_frames repeats frames.
    Returns int [num_frames], non-decreasing."""
    u = np.full(num_frames, 0.5) if rng is None else rng.uniform(0, 1, num_frames)
    idx = np.floor((np.arange(num_frames) + u) * n / num_frames).astype(np.int64)
    return np.minimum(idx, n - 1)


def _load_clip(path: str, num_frames: int, size: int, rng: np.random.Generator | None,
               flip: bool) -> np.ndarray:
    """num_frames frames of clip folder `path` -> float32 [F, S, S, 3] in [-1, 1]: one crop for
    the whole clip (the centre square for eval; a random resized crop, and a horizontal flip with
    probability 1/2 when `flip`, for train), as a fraction of the first frame's size (frames of
    another aspect ratio than the first are squashed by it)."""
    frames = clip_frames(path)
    if not frames:
        raise BadExample(path, f"clip folder: {path!r} has no frames")
    chosen = [frames[k] for k in frame_indices(len(frames), num_frames, rng)]
    pics = [images._load_rgb(f, size if rng is None else 2 * size) for f in chosen]
    w, h = pics[0].size
    box = images.centre_box(w, h) if rng is None else images.random_resized_box(w, h, rng)
    frac = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    out = np.stack([images._resized(p, size, (frac[0] * p.size[0], frac[1] * p.size[1],
                                              frac[2] * p.size[0], frac[3] * p.size[1]))
                    for p in pics])
    if rng is not None and flip and rng.uniform() < 0.5:
        out = out[:, :, ::-1]
    return images._to_float(out)


class _ClipEval(grain.transforms.Map):
    def __init__(self, num_frames: int, size: int):
        self.num_frames, self.size = num_frames, size

    def map(self, x):
        return {"video": _load_clip(x["path"], self.num_frames, self.size, None, False),
                "label": x["label"], "id": x["id"]}


class _ClipTrain(grain.transforms.RandomMap):
    def __init__(self, num_frames: int, size: int, flip: bool):
        self.num_frames, self.size, self.flip = num_frames, size, flip

    def random_map(self, x, rng: np.random.Generator):
        return {"video": _load_clip(x["path"], self.num_frames, self.size, rng, self.flip),
                "label": x["label"], "id": x["id"]}


def clip_folder(root: str, split: str, *, image_size: int, num_frames: int, seed: int = 0,
                eval_fraction: float = 0.1, skip_bad: bool = False, flip: bool = False
                ) -> tuple[grain.MapDataset, list[str]]:
    """(dataset, class names) of a folder of clips (layouts: `list_clip_folder`).

    Every clip is checked now (`_clip_header`; the bad ones listed at once in a ConfigError,
    or left out with a warning when skip_bad). "train": shuffled by seed, repeated forever,
    random frames within each segment and one random resized crop per clip (and a horizontal
    flip when `flip`: off by default, since it turns left into right), drawn per (seed, index in
    the repeated stream); "eval": in order, segment middles, centre crop.
    Examples: {"video": float32 [F, S, S, 3] in [-1, 1], "label": int32 [], "id": int32 []}."""
    if image_size < 1 or num_frames < 1:
        raise ConfigError(f"image_size={image_size} and num_frames={num_frames} must be positive")
    clips, labels, names = list_clip_folder(root, split, eval_fraction=eval_fraction)
    keep = check_files(clips, _clip_header, what=f"clips of the {split} split of {root!r}",
                       skip_bad=skip_bad)
    if not keep:
        raise ConfigError(f"clip folder: none of the {len(clips)} clips of the {split} split of "
                          f"{root!r} can be read")
    ds = grain.MapDataset.source(
        images.PathRecords([clips[k] for k in keep], [labels[k] for k in keep]))
    if split == "train":
        return ds.shuffle(seed=seed).repeat(None).random_map(
            _ClipTrain(num_frames, image_size, flip), seed=seed), names
    return ds.map(_ClipEval(num_frames, image_size)), names


def write_clip_folder(root: str, *, num_per_class: int, image_size: int, num_frames: int,
                      seed: int = 0, speed: float = 0.08, ext: str = ".jpg") -> str:
    """Write num_per_class moving-shape clips per motion class as root/<class>/<class>_<i>/
    <frame>.jpg (frames numbered from 1, unpadded, as some extractors write them): a clip folder
    to try the real-format path without data; returns root. Labels follow the sorted class
    folder names, not MOTION_CLASSES' order."""
    from PIL import Image
    for c, motion in enumerate(MOTION_CLASSES):
        for i in range(num_per_class):
            clip = draw_motion_clip(np.random.default_rng((3, seed, c, i)), image_size,
                                    num_frames, motion, speed=speed)
            d = os.path.join(root, motion, f"{motion}_{i:04d}")
            os.makedirs(d, exist_ok=True)
            for t, frame in enumerate(clip):
                Image.fromarray(frame).save(os.path.join(d, f"frame_{t + 1}{ext}"), quality=95)
    return root


# ----------------------------------------------------------------------------- model
class VideoViT(ViT):
    """models/vit.py's ViT over the frames of clips (module docstring); the same parameters.
    clips [B, F, S, S, 3] -> (tokens [B, F * N, D], pooled [B, D] = mean over frames).
    The attention layers are built with num_frames (a copy of config.model with the field set:
    a layer built from config.model alone sees images and shifts nothing)."""

    def __init__(self, cfg, image_size: int, num_frames: int, *, dtype=jnp.float32, rngs):
        # the frame count is the data's: a temporal mechanism (STDHA) shifts along F
        super().__init__(layer_config(cfg, num_frames=num_frames), image_size, dtype=dtype,
                         rngs=rngs)
        self.frames = num_frames

    def __call__(self, clips):
        B, F = clips.shape[:2]
        if F != self.frames:
            raise ValueError(f"VideoViT: clips of {F} frames, built for {self.frames} "
                             f"(data.num_frames)")
        tokens, pooled = super().__call__(clips.reshape(B * F, *clips.shape[2:]))
        return (tokens.reshape(B, F * tokens.shape[1], tokens.shape[2]),
                pooled.reshape(B, F, -1).mean(axis=1))


@register_task("video")
class VideoTask(ViTTask):
    """Video classification (configs/video.py): VideoViT on moving shapes by default, a clip
    folder when `config.data.paths=(root,)`. Fields over ViTTask's: data.num_frames (F),
    data.speed (moving shapes: a fraction of the image per frame), data.flip (clip folders:
    horizontal flips in training)."""

    throughput_unit = "clips"
    FIELD_RULES = {"data.num_frames": ">= 1", "data.speed": "> 0"}

    def validate_data(self):
        d = self.config.data
        if not d.paths:
            check_motion(d.image_size, d.num_frames, d.speed)
        super().validate_data()

    def data_description(self) -> str:
        paths = self.config.data.paths
        return f"the clip folder {paths[0]!r}" if paths else "the moving shapes (MOTION_CLASSES)"

    # an image ViT run is a video backbone (the same parameters)
    init_from_tasks = ("vit",)

    def check_init_from(self, source_config):
        # STDHA is softmax attention with shifted keys / values, so a softmax source adapts to it
        src = dict(source_config)
        if src.get("task") in self.init_from_tasks:
            src["task"] = self.config.task
        model = dict(src.get("model", {}))
        if model.get("attention") == "softmax" and self.config.model.attention == "stdha":
            model["attention"] = "stdha"
        src["model"] = model
        super().check_init_from(src)

    def data(self):
        if self._data is None:
            c, d = self.config, self.config.data
            if d.paths:
                kw = dict(image_size=d.image_size, num_frames=d.num_frames, seed=c.seed,
                          skip_bad=d.skip_bad, flip=d.flip)
                train, classes = clip_folder(d.paths[0], "train", **kw)
                evals, _ = clip_folder(d.paths[0], "eval", **kw)
            else:
                kw = dict(image_size=d.image_size, num_frames=d.num_frames, num_train=d.num_train,
                          num_eval=d.num_eval, seed=c.seed, noise=d.noise, speed=d.speed)
                train, evals = motion_clips("train", **kw), motion_clips("eval", **kw)
                classes = list(MOTION_CLASSES)
            self._data = (train, evals, list(classes))
        return self._data

    def inputs(self, batch):
        return batch["video"].astype(compute_dtype(self.config.train.compute_dtype))

    def build_backbone(self, rngs, dtype):
        c = self.config
        return VideoViT(c.model, c.data.image_size, c.data.num_frames, dtype=dtype, rngs=rngs)
