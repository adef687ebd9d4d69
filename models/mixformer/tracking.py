"""Single-object tracking data (the MixFormer family): GOT-10k sequences, the embedded moving-shapes
sequences, search/template crops, training pairs, benchmark metrics and result files.

Conventions
-----------
Boxes. GOT-10k files, `Sequence.boxes`, predictions and result files are (x, y, w, h) in pixels,
in pixel-edge coordinates: pixel (row r, column c) covers [c, c+1) x [r, r+1), so a box covers
[x, x + w) x [y, y + h) (the shapes generator's xyxy boxes are these coordinates, x2 = x + w).
`xywh_to_xyxy` / `xyxy_to_xywh` convert. Inside a crop, boxes are *normalised xyxy*: 0 is the
crop's left/top edge, 1 its right/bottom edge (MixFormer's L1/CIoU targets; a target that leaves
the crop has coordinates outside [0, 1]).

Crops (pytracking `sample_target`, used by MixFormer's processing and its online tracker): a
square of side `ceil(sqrt(w h) * factor)` frame pixels whose corner is the box centre minus half
the side, rounded to whole pixels (so the crop copies whole pixels before the resize), padded
where it leaves the frame (black as pytracking, or the frame's mean colour), resized to
out_size x out_size (PIL bilinear, antialiased when shrinking), as float32 in [-1, 1]. The
returned `CropTransform` is the one affine map between frame pixels and normalised crop
coordinates (u = (x - x0) / side), so boxes go there and back exactly. (pytracking's own
`transform_image_to_crop` assumes the crop is centred on the unrounded box centre and uses the
(crop_sz - 1) / 2 pixel-centre convention, up to half a pixel away from the pixels it cropped.)

Jitter (MixFormer `_get_jittered_box`): size' = size * exp(N(0, 1) * scale_jitter) per side,
centre' = centre + sqrt(w' h') * center_jitter * (U(0, 1) - 0.5) per axis. Only the search crop
is jittered; templates are cropped around their ground-truth box (MixFormer's template jitter
is 0), except that `template_jitter` (a centre jitter, with a scale jitter of a quarter of it)
may jitter the dynamic templates (slots 1..n-1): online, they are cropped around the tracker's
own predicted boxes, not the ground truth. The target box of a pair is the *unjittered* ground
truth in the jittered search crop.

Sampling (`TrackingPairs`, MixFormer's trident sampler): a sequence uniformly, a search frame
uniformly among the frames where the target is present; with one template, the template is a
present frame within `max_gap` frames of the search frame (either side, the search frame
itself included); with several, the first ("initial") template is any present frame and the
others ("dynamic") lie within `max_gap` of the search frame on the initial template's side.
Frames where the target is absent are never templates. Negatives (score-head stage, label 0,
`negative_ratio` of the examples): a frame of the same sequence where the target is absent,
cropped around a centred box of 1/8 of the frame (MixFormer's fake box), or else a present
frame of another sequence cropped around that sequence's own target; their "box" is zeros.

Metrics. Two conventions, each as its reference computes it:
- pytracking / MixFormer analysis (`extract_results.py`): predicted frame 0 is set to the ground
  truth; IoU with the +1-pixel formula (intersection side = min(x+w-1) - max(x) + 1, union from
  w h; the +1 terms cancel, so it equals the plain pixel-edge IoU); centre = x + (w - 1) / 2;
  success(t) = fraction of frames with IoU > t for t = 0, 0.05, .., 1 (21 values); AUC = mean of
  the success curve, so a perfect tracker scores 20/21 (IoU 1 is not > 1); OP50 / OP75 = success
  at 0.5 / 0.75; precision = centre error <= 20 px; normalised precision = centre error with
  each axis divided by the ground-truth w / h <= 0.20. Frames whose ground truth is absent or
  has no area are left out of each sequence's fractions (pytracking's `exclude_invalid_frames=
  True`; its default counts them as failures for success/precision and as successes for
  normalised precision). Per-sequence values are averaged over sequences. A predicted box with
  zero width or height is replaced by the previous frame's prediction (pytracking's rule).
- GOT-10k toolkit (`ExperimentGOT10k.report`): frame 0 is left out, frames where the target is
  absent are left out; AO = mean IoU, SR_t = fraction with IoU > t, over the frames of all
  sequences pooled (the toolkit's "overall"; `per_sequence` has each sequence's own). The
  toolkit clips boxes to the image first; here boxes are not clipped (no image sizes needed).
All metrics are fractions in [0, 1]; the papers print them x 100.

Result files: one `x,y,w,h` line per frame (GOT-10k's comma format, 4 decimals), written to a
temporary file and renamed, so a crash never leaves a partial file that looks complete.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence as SequenceType

import grain
import numpy as np

from trainer.config import ConfigError
from trainer.data import BadExample, check_files
from models.images import IMAGE_EXTENSIONS, _to_float, draw_sequence

OVERLAP_THRESHOLDS = np.linspace(0.0, 1.0, 21)  # pytracking's 0:0.05:1
PRECISION_PIXELS = 20.0
NORMALIZED_PRECISION = 0.20
_FRAME_NAME = re.compile(r"^(\d{8})(\.[A-Za-z]+)$")
_SHAPES_STREAM = 3  # rng stream of the embedded sequences (images.py uses 0..2)


# ----------------------------------------------------------------------------- boxes
def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] (x, y, w, h) -> (x1, y1, x2, y2) = (x, y, x + w, y + h)."""
    b = np.asarray(boxes)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], -1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] (x1, y1, x2, y2) -> (x, y, w, h)."""
    b = np.asarray(boxes)
    return np.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], -1)


def clip_box(box_xywh: SequenceType[float], height: int, width: int, margin: float = 0.0
             ) -> np.ndarray:
    """MixFormer's `clip_box`: keep a predicted box inside the frame, at least `margin` pixels
    wide/high and overlapping the frame by `margin` (so the next search crop stays on it).
    Returns float64 [4] xywh."""
    x1, y1, w, h = (float(v) for v in box_xywh)
    x2, y2 = x1 + w, y1 + h
    x1, x2 = min(max(0.0, x1), width - margin), min(max(margin, x2), width)
    y1, y2 = min(max(0.0, y1), height - margin), min(max(margin, y2), height)
    return np.array([x1, y1, max(margin, x2 - x1), max(margin, y2 - y1)])


# ----------------------------------------------------------------------------- GOT-10k layout
def read_frame(path: str, what: str = "") -> np.ndarray:
    """Decode one frame as uint8 [H, W, 3] RGB; an unreadable or missing file raises
    trainer.data.BadExample naming it (and `what`, e.g. the sequence)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        where = f"{what}: " if what else ""
        raise BadExample(path, f"GOT-10k: {where}cannot read frame {path!r}: {e}") from None


@dataclass(eq=False)
class Sequence:
    """One annotated video.

    name: the sequence's directory name; frames: paths of its F frames in order; boxes: float32
    [F, 4] xywh pixels (NaN rows where unknown: the test split's frames after the first);
    absent: bool [F], True where the target is not in the frame (GOT-10k absence.label)."""
    name: str
    frames: tuple[str, ...]
    boxes: np.ndarray
    absent: np.ndarray
    path: str = ""

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def boxes_xyxy(self) -> np.ndarray:
        """float32 [F, 4] (x1, y1, x2, y2)."""
        return xywh_to_xyxy(self.boxes)

    @property
    def usable(self) -> np.ndarray:
        """bool [F]: the target is present and has a known box with area (templates, search
        frames and evaluated frames are drawn from these)."""
        b = self.boxes
        return ~self.absent & np.isfinite(b).all(1) & (b[:, 2] > 0) & (b[:, 3] > 0)

    def frame(self, k: int) -> np.ndarray:
        """Frame k (0-based) as uint8 [H, W, 3]."""
        return read_frame(self.frames[k], f"sequence {self.name!r}")


def _split_line(line: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", line.strip()) if t]


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():  # a trailing newline (or a few) is not a frame
        lines.pop()
    return lines


def _list_frames(seq_dir: str, name: str) -> list[str]:
    """The frame files 00000001.ext .. 0000000F.ext of a sequence directory, checked contiguous."""
    found = {}
    for f in os.listdir(seq_dir):
        m = _FRAME_NAME.match(f)
        if m and m.group(2).lower() in IMAGE_EXTENSIONS:
            found.setdefault(int(m.group(1)), f)
    if not found:
        raise ConfigError(f"GOT-10k: sequence {name!r}: no frames 00000001.jpg|png... in "
                          f"{seq_dir!r}")
    n = max(found)
    missing = [k for k in range(1, n + 1) if k not in found]
    if missing:
        ext = os.path.splitext(found[n])[1]
        raise ConfigError(f"GOT-10k: sequence {name!r}: missing frame "
                          f"{os.path.join(seq_dir, f'{missing[0]:08d}{ext}')!r} ({len(missing)} "
                          f"missing of {n})")
    return [os.path.join(seq_dir, found[k]) for k in range(1, n + 1)]


def _load_sequence(seq_dir: str, name: str, first_box_only: bool) -> Sequence:
    if not os.path.isdir(seq_dir):
        raise ConfigError(f"GOT-10k: sequence {name!r}: directory {seq_dir!r} (listed in "
                          f"list.txt) does not exist")
    frames = _list_frames(seq_dir, name)
    n = len(frames)
    gt_path = os.path.join(seq_dir, "groundtruth.txt")
    if not os.path.isfile(gt_path):
        raise ConfigError(f"GOT-10k: sequence {name!r}: missing {gt_path!r}")
    lines = _read_lines(gt_path)
    if len(lines) > n:
        ext = os.path.splitext(frames[-1])[1]
        raise ConfigError(f"GOT-10k: sequence {name!r}: {gt_path}: {len(lines)} boxes but only {n} "
                          f"frames: missing frame "
                          f"{os.path.join(seq_dir, f'{n + 1:08d}{ext}')!r}")
    if len(lines) < n and not (first_box_only and len(lines) == 1):
        raise ConfigError(f"GOT-10k: sequence {name!r}: {gt_path}:{len(lines) + 1}: "
                          f"groundtruth.txt is short: {len(lines)} lines for {n} frames (only a "
                          f"first-frame box is accepted, with first_box_only=True)")
    absent = np.zeros(n, bool)
    ab_path = os.path.join(seq_dir, "absence.label")
    if os.path.isfile(ab_path):
        ab = _read_lines(ab_path)
        if len(ab) < n:
            raise ConfigError(f"GOT-10k: sequence {name!r}: {ab_path}:{len(ab) + 1}: absence.label "
                              f"is short: {len(ab)} lines for {n} frames")
        for k, line in enumerate(ab[:n]):
            if line.strip() not in ("0", "1"):
                raise ConfigError(f"GOT-10k: sequence {name!r}: {ab_path}:{k + 1}: expected 0 or "
                                  f"1, got {line.strip()!r}")
            absent[k] = line.strip() == "1"
    boxes = np.full((n, 4), np.nan, np.float32)
    for k, line in enumerate(lines):
        parts = _split_line(line)
        try:
            vals = [float(t) for t in parts]
        except ValueError:
            vals = []
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            raise ConfigError(f"GOT-10k: sequence {name!r}: {gt_path}:{k + 1}: expected 'x,y,w,h' "
                              f"(4 numbers), got {line.strip()!r}")
        if not absent[k] and (vals[2] <= 0 or vals[3] <= 0):
            raise ConfigError(f"GOT-10k: sequence {name!r}: {gt_path}:{k + 1}: zero-size box "
                              f"{line.strip()!r} on a frame where the target is present")
        boxes[k] = vals
    return Sequence(name, tuple(frames), boxes, absent, seq_dir)


def load_got10k(root: str, split: str | None = None, *, first_box_only: bool = False,
                skip_bad: bool = False) -> list[Sequence]:
    """The sequences of a GOT-10k split: `root/list.txt` (split=None) or `root/<split>/list.txt`,
    one sequence directory per line, in list order.

    Annotations are checked now, and the frames' sizes (an empty frame: a ConfigError listing
    them all, or with skip_bad its sequence left out); frames are not decoded (one that cannot
    be raises trainer.data.BadExample when read). Errors name the sequence, the file and the line: a missing
    list.txt, a missing, short (fewer lines than frames) or long (more lines than frames: a
    missing frame file) groundtruth.txt, a malformed line, a zero-size box on a frame where the
    target is present, a gap in the frame numbers. first_box_only=True accepts a groundtruth.txt
    with only the first frame's box (the test split; the other rows are NaN). skip_bad=True
    skips bad sequences instead, with one warning that counts them and quotes the first error.
    Presence comes from absence.label (all present without one); cover.label, cut_by_image.label
    and meta_info.ini are not read.
    """
    base = root if split is None else os.path.join(root, split)
    list_path = os.path.join(base, "list.txt")
    if not os.path.isfile(list_path):
        hint = "" if split else " (pass split='train'|'val'|'test' for root/<split>/list.txt)"
        raise ConfigError(f"GOT-10k: missing {list_path!r}{hint}")
    names = [x.strip() for x in _read_lines(list_path) if x.strip()]
    if not names:
        raise ConfigError(f"GOT-10k: {list_path!r} lists no sequences")
    out, bad = [], []
    for name in names:
        try:
            out.append(_load_sequence(os.path.join(base, name), name, first_box_only))
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            if not isinstance(e, ConfigError):
                e = ConfigError(f"GOT-10k: sequence {name!r}: {e}")
            if not skip_bad:
                raise e from None
            bad.append(str(e))
    if bad:
        warnings.warn(f"GOT-10k: skipped {len(bad)} of {len(names)} sequences listed in "
                      f"{list_path!r} (skip_bad=True); the first: {bad[0]}", stacklevel=2)
    # the frames' size pass (a header read of every frame of a 1.4M-frame split would take
    # minutes; a frame that exists but does not decode stops or is replaced when read)
    frames = [f for s in out for f in s.frames]
    keep = set(check_files(frames, lambda path: None, what=f"frames of {list_path!r}",
                           skip_bad=skip_bad))
    if len(keep) < len(frames):
        first, kept = 0, []
        for s in out:
            if all(k in keep for k in range(first, first + len(s))):
                kept.append(s)
            first += len(s)
        out = kept  # (skip_bad: a sequence with an empty frame is left out whole)
    if not out:
        raise ConfigError(f"GOT-10k: no usable sequence in {list_path!r}")
    return out


# ----------------------------------------------------------------------------- embedded default
def _shapes_params(split: str, **kw) -> dict:
    return {"generator": "models.mixformer.tracking.write_shapes_got10k", "version": 1, "split": split,
            **kw}


def _is_written(split_dir: str, params: dict) -> bool:
    try:
        with open(os.path.join(split_dir, "shapes.json"), encoding="utf-8") as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def write_shapes_got10k(root: str, *, num_sequences: int, num_frames: int, image_size: int,
                        seed: int = 0, num_distractors: int = 1, noise: float = 0.1,
                        max_speed: float = 0.05, num_val_sequences: int | None = None) -> str:
    """The embedded tracking data: moving-shapes videos (`draw_sequence`) written as a GOT-10k
    layout, read back by `load_got10k(root, "train" | "val")` like real data. Returns root.

    Splits "train" (num_sequences) and "val" (num_val_sequences, default num_sequences);
    sequence k of split j (0 = train, 1 = val) is draw_sequence(np.random.default_rng((3, seed,
    j, k)), ...), so the splits never share a video. Frames are PNG (lossless: the loader
    returns the generator's pixels); groundtruth.txt is the target's tight box as xywh;
    absence.label is 1 where less than half of the target is visible.

    Idempotent: each split records its parameters in <split>/shapes.json and is not rewritten
    when they are equal. A split is written into a hidden temporary directory and renamed into
    place, so an interrupted write leaves no half split; a split directory that was not written
    here is never replaced (ConfigError)."""
    if num_sequences < 1 or num_frames < 1:
        raise ConfigError(f"write_shapes_got10k: need num_sequences >= 1 and num_frames >= 1 "
                          f"(got {num_sequences}, {num_frames})")
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    counts = {"train": num_sequences,
              "val": num_sequences if num_val_sequences is None else num_val_sequences}
    for j, (split, count) in enumerate(counts.items()):
        params = _shapes_params(split, num_sequences=count, num_frames=num_frames,
                                image_size=image_size, seed=seed, num_distractors=num_distractors,
                                noise=noise, max_speed=max_speed)
        split_dir = os.path.join(root, split)
        if _is_written(split_dir, params):
            continue
        if os.path.isdir(split_dir) and os.listdir(split_dir) and not os.path.isfile(
                os.path.join(split_dir, "shapes.json")):
            raise ConfigError(f"write_shapes_got10k: {split_dir!r} exists and was not written by "
                              f"write_shapes_got10k; not replacing it")
        tmp = tempfile.mkdtemp(prefix=f".{split}.tmp", dir=root)
        try:
            names = []
            for k in range(count):
                name = f"GOT-10k_{split.capitalize()}_{k + 1:06d}"
                seq_dir = os.path.join(tmp, name)
                os.makedirs(seq_dir)
                video = draw_sequence(np.random.default_rng((_SHAPES_STREAM, seed, j, k)),
                                      image_size, num_frames, num_distractors=num_distractors,
                                      noise=noise, max_speed=max_speed)
                for f, img in enumerate(video["frames"]):
                    Image.fromarray(img).save(os.path.join(seq_dir, f"{f + 1:08d}.png"))
                with open(os.path.join(seq_dir, "groundtruth.txt"), "w", encoding="utf-8") as fh:
                    fh.writelines(_format_row(b) + "\n" for b in xyxy_to_xywh(video["boxes"]))
                with open(os.path.join(seq_dir, "absence.label"), "w", encoding="utf-8") as fh:
                    fh.writelines(f"{int(not v)}\n" for v in video["visible"])
                names.append(name)
            with open(os.path.join(tmp, "list.txt"), "w", encoding="utf-8") as fh:
                fh.writelines(f"{n}\n" for n in names)
            with open(os.path.join(tmp, "shapes.json"), "w", encoding="utf-8") as fh:
                json.dump(params, fh)
            if os.path.isdir(split_dir):  # ours, with other parameters or half-removed
                old = tempfile.mkdtemp(prefix=f".{split}.old", dir=root)
                os.rename(split_dir, os.path.join(old, split))
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, split_dir)
            except OSError:
                # another process renamed its copy in first: fine if it wrote the same thing
                if not _is_written(split_dir, params):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------- crops
def jittered_box(box_xywh: SequenceType[float], rng: np.random.Generator, *, scale_jitter: float,
                 center_jitter: float) -> np.ndarray:
    """MixFormer's `_get_jittered_box`: float64 [4] xywh with
    (w', h') = (w, h) * exp(N(0, 1) * scale_jitter) and
    centre' = centre + sqrt(w' h') * center_jitter * (U(0, 1) - 0.5), independently per axis."""
    x, y, w, h = (float(v) for v in box_xywh)
    size = np.array([w, h]) * np.exp(rng.standard_normal(2) * scale_jitter)
    max_offset = math.sqrt(size[0] * size[1]) * center_jitter
    centre = np.array([x + 0.5 * w, y + 0.5 * h]) + max_offset * (rng.uniform(size=2) - 0.5)
    return np.concatenate([centre - 0.5 * size, size])


@dataclass(frozen=True)
class CropTransform:
    """Where a crop lies in its frame: the frame region [x0, x0 + side) x [y0, y0 + side),
    resized to out_size x out_size pixels. Normalised crop coordinates are u = (x - x0) / side,
    v = (y - y0) / side: one affine map each way, exact up to float64 rounding."""
    x0: float
    y0: float
    side: float
    out_size: int

    @property
    def scale(self) -> float:
        """Crop pixels per frame pixel (pytracking's resize_factor)."""
        return self.out_size / self.side

    def to_crop(self, box_xywh: np.ndarray) -> np.ndarray:
        """Frame boxes [..., 4] xywh pixels -> float64 [..., 4] normalised xyxy in the crop."""
        b = np.asarray(box_xywh, np.float64)
        x, y, w, h = (b[..., i] for i in range(4))
        s = self.side
        return np.stack([(x - self.x0) / s, (y - self.y0) / s,
                         (x + w - self.x0) / s, (y + h - self.y0) / s], -1)

    def to_frame(self, norm_xyxy: np.ndarray) -> np.ndarray:
        """Normalised crop boxes [..., 4] xyxy -> float64 [..., 4] xywh frame pixels."""
        b = np.asarray(norm_xyxy, np.float64)
        x1, y1, x2, y2 = (b[..., i] for i in range(4))
        s = self.side
        return np.stack([self.x0 + x1 * s, self.y0 + y1 * s, (x2 - x1) * s, (y2 - y1) * s], -1)


def crop_region(box_xywh: SequenceType[float], factor: float, out_size: int) -> CropTransform:
    """The crop `crop` takes around a box, without reading pixels (pytracking `sample_target`:
    side = ceil(sqrt(w h) * factor), corner = round(centre - side / 2))."""
    x, y, w, h = (float(v) for v in box_xywh)
    if not (all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0):
        raise ValueError(f"crop: box {list(box_xywh)} must be finite with w, h > 0")
    side = math.ceil(math.sqrt(w * h) * factor)
    if side < 1:
        raise ValueError(f"crop: box {list(box_xywh)} x factor {factor} is under one pixel")
    return CropTransform(float(round(x + 0.5 * w - 0.5 * side)),
                         float(round(y + 0.5 * h - 0.5 * side)), float(side), int(out_size))


def crop(frame: np.ndarray, box_xywh: SequenceType[float], factor: float, out_size: int, *,
         pad: str = "black") -> tuple[np.ndarray, CropTransform]:
    """A square crop around a box, resized: (patch float32 [out_size, out_size, 3] in [-1, 1],
    transform). frame: uint8 [H, W, 3]. Outside the frame the crop is padded with black
    (pad="black", pytracking's constant border) or the frame's mean colour (pad="mean", SiamFC).
    Allocates side^2 x 3 bytes before the resize, as pytracking does."""
    if pad not in ("black", "mean"):
        raise ValueError(f"crop: pad must be 'black' or 'mean', got {pad!r}")
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"crop: frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    t = crop_region(box_xywh, factor, out_size)
    side, x0, y0 = int(t.side), int(t.x0), int(t.y0)
    h, w = frame.shape[:2]
    fill = np.rint(frame.reshape(-1, 3).mean(0)) if pad == "mean" else 0
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    fx0, fx1, fy0, fy1 = max(x0, 0), min(x0 + side, w), max(y0, 0), min(y0 + side, h)
    if fx1 > fx0 and fy1 > fy0:
        canvas[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0] = frame[fy0:fy1, fx0:fx1]
    if side != out_size:
        from PIL import Image
        canvas = np.asarray(Image.fromarray(canvas).resize((out_size, out_size), Image.BILINEAR))
    return _to_float(canvas), t


# ----------------------------------------------------------------------------- training pairs
@dataclass(frozen=True)
class PairPlan:
    """Which frames an example uses: templates from `sequence`, the search frame from
    `search_sequence` (another sequence only for a negative); label 1 = positive."""
    sequence: int
    template_frames: tuple[int, ...]
    search_sequence: int
    search_frame: int
    label: int


class TrackingPairs:
    """Random-access source of MixFormer training examples (sampling and jitter: module doc).

    Example i is drawn from np.random.default_rng((seed, i)) (`sample` draws one from any
    generator: the train pipeline's per-epoch draws). Examples:
        "template": float32 [num_templates, T, T, 3] in [-1, 1] (T = template_size)
        "search":   float32 [S, S, 3] in [-1, 1] (S = search_size)
        "box":      float32 [4], the target's ground truth as normalised xyxy in the search
                    crop (zeros for a negative)
        "label":    float32 [], 1 = the target is in the search crop, 0 = a negative
        "id":       int32 [], the example index
    """

    def __init__(self, sequences: SequenceType[Sequence], *, template_size: int, search_size: int,
                 template_factor: float = 2.0, search_factor: float = 4.0, max_gap: int,
                 num_templates: int = 1, scale_jitter: float = 0.25, center_jitter: float = 3.0,
                 negative_ratio: float = 0.0, samples_per_epoch: int = 1000, seed: int = 0,
                 pad: str = "black", template_jitter: float = 0.0):
        if template_size < 1 or search_size < 1 or template_factor <= 0 or search_factor <= 0:
            raise ConfigError(f"TrackingPairs: sizes must be >= 1 and factors > 0 (template "
                              f"{template_size} px x {template_factor}, search {search_size} px "
                              f"x {search_factor})")
        if max_gap < 0 or num_templates < 1 or samples_per_epoch < 1:
            raise ConfigError(f"TrackingPairs: need max_gap >= 0, num_templates >= 1, "
                              f"samples_per_epoch >= 1 (got {max_gap}, {num_templates}, "
                              f"{samples_per_epoch})")
        if (not 0.0 <= negative_ratio <= 1.0 or scale_jitter < 0 or center_jitter < 0
                or template_jitter < 0):
            raise ConfigError(f"TrackingPairs: need 0 <= negative_ratio <= 1 and jitters >= 0 "
                              f"(got negative_ratio {negative_ratio}, scale_jitter {scale_jitter}, "
                              f"center_jitter {center_jitter}, template_jitter {template_jitter})")
        self.sequences = list(sequences)
        self.template_size, self.search_size = template_size, search_size
        self.template_factor, self.search_factor = template_factor, search_factor
        self.max_gap, self.num_templates = max_gap, num_templates
        self.scale_jitter, self.center_jitter = scale_jitter, center_jitter
        self.negative_ratio, self.samples_per_epoch = negative_ratio, samples_per_epoch
        self.seed, self.pad, self.template_jitter = seed, pad, template_jitter
        self._usable = [np.flatnonzero(s.usable) for s in self.sequences]
        self._pool = [q for q, u in enumerate(self._usable) if len(u)]
        if not self._pool:
            raise ConfigError("TrackingPairs: no sequence has a frame with the target present")
        if negative_ratio > 0 and len(self._pool) < 2 and not any(
                self.sequences[q].absent.any() for q in self._pool):
            raise ConfigError("TrackingPairs: negatives (negative_ratio > 0) need a second "
                              "sequence or a frame where the target is absent")

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, i))

    def plan(self, i: int) -> PairPlan:
        """The frames example i uses (what `__getitem__(i)` crops)."""
        return self._plan(self._rng(self._index(i)))

    def _index(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"example {i} of {self.samples_per_epoch}")
        return i

    def _plan(self, rng: np.random.Generator) -> PairPlan:
        q = self._pool[rng.integers(len(self._pool))]
        usable = self._usable[q]
        s = int(rng.choice(usable))
        if self.num_templates == 1:
            window = usable[np.abs(usable - s) <= self.max_gap]  # holds s: never empty
            templates = [int(rng.choice(window))]
        else:  # trident: an initial template anywhere, dynamic ones near the search frame
            t0 = int(rng.choice(usable))
            lo, hi = (s, s + self.max_gap) if t0 >= s else (s - self.max_gap, s)
            window = usable[(usable >= lo) & (usable <= hi)]
            templates = [t0] + [int(v) for v in rng.choice(window, self.num_templates - 1)]
        if rng.uniform() >= self.negative_ratio:
            return PairPlan(q, tuple(templates), q, s, 1)
        absent = np.flatnonzero(self.sequences[q].absent)
        if len(absent):
            return PairPlan(q, tuple(templates), q, int(rng.choice(absent)), 0)
        others = [p for p in self._pool if p != q]
        r = others[rng.integers(len(others))]
        return PairPlan(q, tuple(templates), r, int(rng.choice(self._usable[r])), 0)

    def _search_crop(self, frame: np.ndarray, box: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, CropTransform]:
        h, w = frame.shape[:2]
        for _ in range(10):  # MixFormer redraws a sample whose crop is empty or all padding
            jb = jittered_box(box, rng, scale_jitter=self.scale_jitter,
                              center_jitter=self.center_jitter)
            try:
                t = crop_region(jb, self.search_factor, self.search_size)
            except ValueError:
                continue
            if t.x0 < w and t.y0 < h and t.x0 + t.side > 0 and t.y0 + t.side > 0:
                return crop(frame, jb, self.search_factor, self.search_size, pad=self.pad)
        return crop(frame, box, self.search_factor, self.search_size, pad=self.pad)

    def sample(self, rng: np.random.Generator, example_id: int = 0) -> dict[str, np.ndarray]:
        """One example drawn from rng (the plan, then the jitter)."""
        p = self._plan(rng)
        seq = self.sequences[p.sequence]
        boxes = [np.asarray(seq.boxes[f], np.float64) for f in p.template_frames]
        if self.template_jitter > 0:  # the dynamic templates, as the tracker's own boxes err
            boxes[1:] = [jittered_box(b, rng, scale_jitter=self.template_jitter / 4,
                                      center_jitter=self.template_jitter) for b in boxes[1:]]
        templates = np.stack([
            crop(seq.frame(f), b, self.template_factor, self.template_size, pad=self.pad)[0]
            for f, b in zip(p.template_frames, boxes)])
        sseq = self.sequences[p.search_sequence]
        frame = sseq.frame(p.search_frame)
        if p.label == 0 and sseq.absent[p.search_frame]:
            h, w = frame.shape[:2]  # MixFormer's fake box: 1/8 of the frame, centred
            box = np.array([w / 2 - w / 16, h / 2 - h / 16, w / 8, h / 8])
        else:
            box = sseq.boxes[p.search_frame].astype(np.float64)
        search, t = self._search_crop(frame, box, rng)
        target = t.to_crop(box) if p.label else np.zeros(4)
        return {"template": templates, "search": search, "box": target.astype(np.float32),
                "label": np.float32(p.label), "id": np.int32(example_id)}

    def __getitem__(self, i):
        i = self._index(i)
        return self.sample(self._rng(i), i)

    def _getitems(self, indices):
        """Batched read (grain's SupportsBatchedReadRandomAccessDataSource)."""
        return [self[i] for i in indices]


class _Draw(grain.transforms.RandomMap):
    def __init__(self, pairs: TrackingPairs):
        self.pairs = pairs

    def random_map(self, i, rng: np.random.Generator):
        return self.pairs.sample(rng, int(i))


def tracking_pairs(sequences: SequenceType[Sequence], split: str, *, template_size: int,
                   search_size: int, max_gap: int, samples_per_epoch: int = 1000, seed: int = 0,
                   **kwargs) -> grain.MapDataset:
    """Training pairs as a grain.MapDataset (examples: `TrackingPairs`; kwargs go to it).

    "train": samples_per_epoch indices shuffled by seed and repeated forever; each element is
    drawn by grain's `random_map` placed after `repeat`, whose generator is seeded by (seed,
    index in the repeated stream): deterministic, and fresh pairs and jitter every epoch (as
    MixFormer's sampler draws anew for every item). "eval": the finite source, example i from
    (seed, i), in order."""
    pairs = TrackingPairs(sequences, template_size=template_size, search_size=search_size,
                          max_gap=max_gap, samples_per_epoch=samples_per_epoch, seed=seed,
                          **kwargs)
    if split == "train":
        return (grain.MapDataset.range(samples_per_epoch).shuffle(seed=seed).repeat(None)
                .random_map(_Draw(pairs), seed=seed))
    if split == "eval":
        return grain.MapDataset.source(pairs)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


# ----------------------------------------------------------------------------- metrics
def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes a, b [N, 4] -> float64 [N], pytracking's `calc_iou_overlap`: the
    +1-pixel formula (intersection side = min(x + w - 1) - max(x) + 1, clamped at 0; union =
    w_a h_a + w_b h_b - intersection), which equals the pixel-edge IoU of [x, x + w)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    tl = np.maximum(a[..., :2], b[..., :2])
    br = np.minimum(a[..., :2] + a[..., 2:] - 1.0, b[..., :2] + b[..., 2:] - 1.0)
    inter = np.clip(br - tl + 1.0, 0.0, None).prod(-1)
    union = a[..., 2:].prod(-1) + b[..., 2:].prod(-1) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def center_errors(pred: np.ndarray, gt: np.ndarray, *, normalized: bool = False) -> np.ndarray:
    """Centre distance [N] between xywh boxes [N, 4] (pytracking `calc_err_center`, centre =
    x + (w - 1) / 2); normalized=True divides each axis by the ground truth's w / h first."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    d = (pred[..., :2] + 0.5 * (pred[..., 2:] - 1.0)) - (gt[..., :2] + 0.5 * (gt[..., 2:] - 1.0))
    if normalized:
        d = d / gt[..., 2:]
    return np.sqrt((d ** 2).sum(-1))


def success_curve(ious: np.ndarray, thresholds: np.ndarray = OVERLAP_THRESHOLDS) -> np.ndarray:
    """Fraction of frames with IoU > t, for each threshold t: float64 [len(thresholds)]."""
    ious = np.asarray(ious, np.float64).reshape(-1, 1)
    if not len(ious):
        raise ValueError("success_curve: no frames")
    return (ious > np.asarray(thresholds)[None, :]).mean(0)


def auc(curve: np.ndarray) -> float:
    """Area under a success curve as pytracking computes it: the mean over its thresholds
    (a perfect tracker: 20/21 on the 21 thresholds 0, 0.05, .., 1)."""
    return float(np.mean(curve))


def precision(center_error: np.ndarray, threshold: float = PRECISION_PIXELS) -> float:
    """Fraction of frames with centre error <= threshold pixels."""
    return float(np.mean(np.asarray(center_error) <= threshold))


def normalized_precision(normalized_center_error: np.ndarray,
                         threshold: float = NORMALIZED_PRECISION) -> float:
    """Fraction of frames with normalised centre error (`center_errors(normalized=True)`)
    <= threshold."""
    return float(np.mean(np.asarray(normalized_center_error) <= threshold))


def ao(ious: np.ndarray) -> float:
    """GOT-10k average overlap: the mean IoU."""
    return float(np.mean(ious))


def sr(ious: np.ndarray, threshold: float = 0.5) -> float:
    """GOT-10k success rate: the fraction of frames with IoU > threshold."""
    return float(np.mean(np.asarray(ious) > threshold))


def _prepared(seq: Sequence, pred: np.ndarray) -> np.ndarray:
    """The predictions as pytracking scores them: checked, zero-size boxes replaced by the
    previous prediction, frame 0 set to the ground truth."""
    pred = np.array(pred, np.float64)
    if pred.shape != (len(seq), 4):
        raise ValueError(f"evaluate_results: sequence {seq.name!r}: predictions of shape "
                         f"{pred.shape}, expected ({len(seq)}, 4)")
    if not np.isfinite(pred).all() or (pred[:, 2:] < 0).any():
        raise ValueError(f"evaluate_results: sequence {seq.name!r}: predictions must be finite "
                         f"with w, h >= 0")
    if not np.isfinite(seq.boxes[0]).all():
        raise ValueError(f"evaluate_results: sequence {seq.name!r} has no first-frame box")
    for k in range(1, len(pred)):
        if (pred[k, 2:] == 0).any():
            pred[k] = pred[k - 1]
    pred[0] = seq.boxes[0]
    return pred


def evaluate_results(sequences: SequenceType[Sequence], predicted_boxes: Mapping[str, np.ndarray]
                     ) -> dict:
    """Benchmark metrics of predictions {sequence name: [F, 4] xywh} (conventions: module doc).

    Returns {"auc", "op50", "op75", "precision", "normalized_precision": pytracking's, averaged
    over sequences; "success_curve": list [21], the mean success curve; "ao", "sr50", "sr75":
    GOT-10k's, frames pooled; "num_sequences"; "per_sequence": {name: the same per sequence}}.
    Every sequence needs predictions and a ground truth on its frames (not the test split)."""
    missing = [s.name for s in sequences if s.name not in predicted_boxes]
    if missing:
        raise ValueError(f"evaluate_results: no predictions for {len(missing)} sequences, e.g. "
                         f"{missing[:3]}")
    if not sequences:
        raise ValueError("evaluate_results: no sequences")
    per, curves, pooled = {}, [], []
    for seq in sequences:
        pred = _prepared(seq, predicted_boxes[seq.name])
        valid = seq.usable
        if not valid.any():
            raise ValueError(f"evaluate_results: sequence {seq.name!r} has no frame with a "
                             f"present, known target box")
        gt = seq.boxes.astype(np.float64)
        ious = iou_xywh(pred[valid], gt[valid])
        curve = success_curve(ious)
        got = iou_xywh(pred[1:], gt[1:])[valid[1:]]  # GOT-10k: frame 0 out, absent frames out
        pooled.append(got)
        curves.append(curve)
        per[seq.name] = {
            "auc": auc(curve), "op50": sr(ious, 0.5), "op75": sr(ious, 0.75),
            "precision": precision(center_errors(pred[valid], gt[valid])),
            "normalized_precision": normalized_precision(
                center_errors(pred[valid], gt[valid], normalized=True)),
            "ao": ao(got) if len(got) else float("nan"),
            "sr50": sr(got, 0.5) if len(got) else float("nan"),
            "sr75": sr(got, 0.75) if len(got) else float("nan")}
    mean = lambda k: float(np.mean([v[k] for v in per.values()]))
    frames = np.concatenate(pooled)
    return {"auc": mean("auc"), "op50": mean("op50"), "op75": mean("op75"),
            "precision": mean("precision"), "normalized_precision": mean("normalized_precision"),
            "success_curve": np.mean(curves, 0).tolist(),
            "ao": ao(frames) if len(frames) else float("nan"),
            "sr50": sr(frames, 0.5) if len(frames) else float("nan"),
            "sr75": sr(frames, 0.75) if len(frames) else float("nan"),
            "num_sequences": len(per), "per_sequence": per}


# ----------------------------------------------------------------------------- success plot
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _plot_pil(curves: list[tuple[str, np.ndarray]], path: str, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont
    width, height, left, right, top, bottom = 800, 560, 70, 250, 40, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pw, ph = width - left - right, height - top - bottom
    px = lambda x: left + x * pw
    py = lambda y: top + (1 - y) * ph
    for k in range(11):
        v = k / 10
        d.line([(px(v), top), (px(v), top + ph)], fill=(225, 225, 225))
        d.line([(left, py(v)), (left + pw, py(v))], fill=(225, 225, 225))
        d.text((px(v) - 8, top + ph + 6), f"{v:.1f}", fill="black", font=font)
        d.text((left - 30, py(v) - 6), f"{v:.1f}", fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw / 2 - 60, height - 25), "Overlap threshold", fill="black", font=font)
    d.text((8, top - 25), "Success rate", fill="black", font=font)
    d.text((left + pw / 2 - 60, 10), title, fill="black", font=font)
    for n, (name, curve) in enumerate(curves):
        colour = _COLOURS[n % len(_COLOURS)]
        xs = np.linspace(0, 1, len(curve))
        d.line([(px(x), py(y)) for x, y in zip(xs, curve)], fill=colour, width=3)
        ly = top + 10 + 20 * n
        d.line([(left + pw + 15, ly + 6), (left + pw + 40, ly + 6)], fill=colour, width=3)
        d.text((left + pw + 46, ly), f"{name} [{100 * auc(curve):.1f}]", fill="black", font=font)
    img.save(path, "PNG")


def _plot_matplotlib(curves: list[tuple[str, np.ndarray]], path: str, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    fig = Figure(figsize=(8, 5.6))
    ax = fig.add_subplot()
    for name, curve in curves:
        ax.plot(np.linspace(0, 1, len(curve)), curve, label=f"{name} [{100 * auc(curve):.1f}]",
                linewidth=2)
    ax.set(xlabel="Overlap threshold", ylabel="Success rate", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.grid(True)
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
    fig.savefig(path, format="png", bbox_inches="tight")


def success_plot(curves: Mapping[str, np.ndarray], path: str, *, title: str = "Success plot",
                 backend: str = "auto") -> str:
    """Write success curves {name: [T] success rates over thresholds linspace(0, 1, T)} as a
    PNG, legend "name [AUC x 100]" sorted by AUC (pytracking's plot). backend: "matplotlib",
    "pil" or "auto" (matplotlib when importable, else PIL; matplotlib is not a dependency).
    Written to a temporary file and renamed. Returns path."""
    if backend == "auto":
        import importlib.util
        backend = "matplotlib" if importlib.util.find_spec("matplotlib") else "pil"
    if backend not in ("matplotlib", "pil"):
        raise ValueError(f"success_plot: backend must be 'auto', 'matplotlib' or 'pil', got "
                         f"{backend!r}")
    if not curves:
        raise ValueError("success_plot: no curves")
    ordered = sorted(((n, np.asarray(c, np.float64)) for n, c in curves.items()),
                     key=lambda nc: -auc(nc[1]))
    draw = _plot_matplotlib if backend == "matplotlib" else _plot_pil
    _atomic_write(path, lambda tmp: draw(ordered, tmp, title))
    return path


# ----------------------------------------------------------------------------- result files
def _format_row(box: np.ndarray) -> str:
    return ",".join(f"{float(v):.4f}" for v in box)


def _atomic_write(path: str, write) -> None:
    """write(tmp) then rename onto path; on failure the temporary file is removed and path is
    left as it was (absent, or its previous content)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_lines(path: str, lines) -> str:
    """Write `lines` (strings, one per line; an iterable consumed while writing), atomically:
    if producing or writing a line fails, path is left as it was. Returns path."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{line}\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
    _atomic_write(path, write)
    return path


def write_result(path: str, boxes_xywh: np.ndarray) -> str:
    """Write a tracker's boxes [F, 4] xywh as F lines `x,y,w,h` (4 decimals), atomically.
    Returns path."""
    boxes = np.asarray(boxes_xywh, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        raise ValueError(f"write_result: boxes must be finite [F, 4], got shape {boxes.shape}")
    return write_lines(path, (_format_row(b) for b in boxes))


def read_result(path: str) -> np.ndarray:
    """A result file (comma-, tab- or space-separated x,y,w,h lines) -> float64 [F, 4]; a
    malformed line raises ValueError naming the file and line."""
    rows = []
    for k, line in enumerate(_read_lines(path)):
        try:
            vals = [float(t) for t in _split_line(line)]
        except ValueError:
            vals = []
        if len(vals) != 4:
            raise ValueError(f"read_result: {path}:{k + 1}: expected 'x,y,w,h', got "
                             f"{line.strip()!r}")
        rows.append(vals)
    return np.array(rows, np.float64).reshape(-1, 4)
