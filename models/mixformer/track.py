"""The online tracker: python -m trainer.track --config=FILE:VARIANT --from=WORKDIR [--sequences=DIR]

Runs a trained tracking model (MixFormer, configs/mixformer.py) over GOT-10k-layout sequences
(default: the config's held-out embedded sequences) with MixFormer's online loop
(lib/test/tracker/mixformer_vit_online.py):
  frame 0: the ground-truth box; the initial template is cropped around it and fills every
    template slot; encode_templates caches the templates' keys / values;
  frame t: crop the search region around the previous box (data.search_factor), predict, map
    the box back to the frame and clip it; a prediction scoring above track.score_threshold and
    above the best so far becomes the candidate template; every track.update_interval frames the
    candidate replaces the online template (slot 1..n-1, FIFO) and the cache is re-encoded.
Writes one result file per sequence (<out>/<sequence>.txt, x,y,w,h per line, written atomically:
an interrupted run never leaves a partial file), then prints AUC, precision, normalised
precision, AO, SR0.5 / SR0.75 against the ground truth, with a success plot (<out>/success.png)
beside the "stay on the first box" baseline, and frames/s (compilation excluded: the model is
compiled on the first frame before anything is timed).

The GOT-10k test split (groundtruth.txt holds the first frame's box only, in every sequence) is
recognised: no metrics (there is no ground truth to score), and the results are written in the
layout the GOT-10k evaluation server takes instead, <out>/<seq>/<seq>_001.txt (boxes) and
<out>/<seq>/<seq>_time.txt (seconds per frame); --submission writes that layout for any split.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from models.mixformer import tracking
from trainer.api import checkpoint_step, load_checkpoint, run_dir
from trainer.cli import load_config, parse_with_overrides, tool_parser
from trainer.config import ConfigError
from trainer.data import BadExample
from trainer.task import get_task


def parse_args(argv):
    p = tool_parser("python -m trainer.track", __doc__.split("\n\n")[0],
                    example="configs/mixformer.py:score",
                    from_help="the trained run's workdir (its newest checkpoint)")
    p.add_argument("--sequences", default=None,
                   help="a GOT-10k root (list.txt) or split folder; default: the config's eval split")
    p.add_argument("--split", default=None, help="the split folder under --sequences (e.g. val)")
    p.add_argument("--out", default=None, help="result folder (default: <from>/tracking)")
    p.add_argument("--limit", type=int, default=0, help="track only the first N sequences")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip sequences with bad annotations (counted) instead of failing")
    p.add_argument("--submission", action="store_true",
                   help="also write the GOT-10k server layout <out>/<seq>/<seq>_001.txt and "
                        "<seq>_time.txt (always, without metrics, on a test split)")
    return parse_with_overrides(p, argv)


class OnlineTracker:
    """MixFormer's online loop for one model (jitted encode / track; batch of one)."""

    def __init__(self, model, config, *, update: bool = True):
        """update=False: track with the initial template only (no online template update)."""
        self.config, self.update = config, update
        graphdef, state = nnx.split(model)
        self.state = state
        self._encode = jax.jit(lambda s, t: nnx.merge(graphdef, s).encode_templates(t))
        self._track = jax.jit(lambda s, c, x: nnx.merge(graphdef, s).track(c, x))

    def run(self, sequence, seconds: list | None = None):
        """sequence (models.mixformer.tracking.Sequence) -> predicted boxes [F, 4] xywh (frame 0 = GT).
        seconds: a list to append each frame's tracking time to (frame 0: the template's
        encoding; reading the frame is not counted, as in the GOT-10k toolkit)."""
        d, m, tr = self.config.data, self.config.model, self.config.track
        first = sequence.frame(0)
        start = time.perf_counter()
        H, W = first.shape[:2]
        box = np.asarray(sequence.boxes[0], np.float64)
        template, _ = tracking.crop(first, box, d.template_factor, m.template_size)
        slots = [template] * m.num_templates  # slot 0 stays the initial template
        cache = jax.block_until_ready(self._encode(self.state, np.stack(slots)[None]))
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
        boxes = [box]
        best, candidate = -1.0, None
        for t in range(1, len(sequence)):
            frame = sequence.frame(t)
            start = time.perf_counter()
            search, transform = tracking.crop(frame, box, d.search_factor, m.search_size)
            out = self._track(self.state, cache, search[None])
            pred = transform.to_frame(np.asarray(out["boxes"][0], np.float64))
            box = tracking.clip_box(pred, H, W, margin=tr.margin)
            boxes.append(box)
            score = float(1 / (1 + np.exp(-float(out["score_logit"][0]))))
            if score > tr.score_threshold and score > best:
                best = score
                candidate, _ = tracking.crop(frame, box, d.template_factor, m.template_size)
            if (self.update and m.num_templates > 1 and t % tr.update_interval == 0
                    and candidate is not None):
                slots = [slots[0]] + slots[2:] + [candidate]  # FIFO over the online slots
                cache = jax.block_until_ready(self._encode(self.state, np.stack(slots)[None]))
                best, candidate = -1.0, None
            if seconds is not None:
                seconds.append(time.perf_counter() - start)
        return np.stack(boxes)

    def compile(self, sequence) -> None:
        """Compile (and run once) encoding and tracking on `sequence`'s first frames, so that
        what is timed afterwards excludes compilation."""
        n = min(len(sequence), 2)
        self.run(dataclasses.replace(sequence, frames=sequence.frames[:n],
                                     boxes=sequence.boxes[:n], absent=sequence.absent[:n]))


def first_box_only(sequence) -> bool:
    """True when groundtruth.txt gave only the first frame's box (the rows after it are NaN)."""
    return bool(np.isnan(sequence.boxes[1:]).all())


def ground_truth_kind(sequences, *, skip_bad: bool = False) -> str:
    """"full" (a box for every frame) or "first" (the GOT-10k test split: the first frame's box
    only, in every sequence of more than one frame), judged over the whole split. A mix of the
    two is a ConfigError naming a first-box-only sequence; with skip_bad those are left out of a
    full split instead (said in a warning), as any bad annotation is."""
    longer = [s for s in sequences if len(s) > 1]
    first = [s.name for s in longer if first_box_only(s)]
    if not first:
        return "full"
    if len(first) == len(longer):
        return "first"
    what = (f"{len(first)} of {len(longer)} sequences have only a first-frame box in "
            f"groundtruth.txt (e.g. {first[0]!r}) while the others have a box per frame")
    if skip_bad:
        warnings.warn(f"--sequences: {what}: those are skipped (--skip_bad)", stacklevel=2)
        return "full"
    raise ConfigError(f"--sequences: {what}: a test split has first boxes only, a train / val "
                      f"split a box per frame (--skip_bad skips the short ones)")


def write_submission(out: str, name: str, boxes: np.ndarray, seconds) -> None:
    """The GOT-10k server's layout for one sequence: <out>/<name>/<name>_001.txt (x,y,w,h per
    frame) and <name>_time.txt (seconds per frame), each written atomically."""
    folder = os.path.join(out, name)
    tracking.write_result(os.path.join(folder, f"{name}_001.txt"), boxes)
    tracking.write_lines(os.path.join(folder, f"{name}_time.txt"),
                         [f"{s:.6f}" for s in seconds])


def load_model(config, source: str):
    """(task, model, step): the config's model with the parameters of `source`'s newest
    checkpoint (trainer.api, the one way to reopen a run)."""
    workdir = run_dir(source)
    step = checkpoint_step(workdir)
    try:
        model, _ = load_checkpoint(workdir, step, config=config)
    except ValueError as e:
        raise ConfigError(f"--from: {source} (step {step}) is not a run of this model: {e}") from None
    return get_task(config.task)(config), model, step


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, overrides)
        task, model, step = load_model(config, args.source)
        if args.sequences:
            # a test split's groundtruth.txt holds the first box only: accepted here, and then
            # either every sequence is so or none is (ground_truth_kind)
            sequences = tracking.load_got10k(args.sequences, args.split, skip_bad=args.skip_bad,
                                             first_box_only=True)
            test_split = ground_truth_kind(sequences, skip_bad=args.skip_bad) == "first"
            if not test_split:
                sequences = [s for s in sequences if len(s) < 2 or not first_box_only(s)]
        else:
            sequences = task.sequences(config.data.eval_split)
            test_split = False
        if args.limit:
            sequences = sequences[:args.limit]
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.source, "tracking")
    os.makedirs(out, exist_ok=True)
    tracker = OnlineTracker(model, config)
    predicted, frames, seconds, failed, compiled = {}, 0, 0.0, [], False
    for seq in tqdm(sequences, desc="tracking", unit="seq", file=sys.stdout,
                    disable=not sys.stdout.isatty()):
        per_frame = []
        try:
            if not compiled:
                tracker.compile(seq)
                compiled = True
            boxes = tracker.run(seq, per_frame)
        except BadExample as e:  # a frame that cannot be read: the other sequences go on
            print(f"error: sequence {seq.name!r} not tracked: {e}", file=sys.stderr)
            failed.append(seq.name)
            continue
        seconds += sum(per_frame)
        frames += len(seq)
        if test_split or args.submission:
            write_submission(out, seq.name, boxes, per_frame)
        if not test_split:
            tracking.write_result(os.path.join(out, f"{seq.name}.txt"), boxes)
        predicted[seq.name] = boxes
    print(f"tracked {len(predicted)} sequences with checkpoint {step} of {args.source}; "
          f"results in {out}")
    if test_split or args.submission:
        print(f"GOT-10k submission layout in {out}: <seq>/<seq>_001.txt and <seq>_time.txt per "
              f"sequence (zip the sequence folders for the evaluation server)")
    if test_split:
        print("test split (groundtruth.txt holds the first frame's box only): no metrics here; "
              "the evaluation server scores the submission")
    if failed:
        print(f"error: {len(failed)} of {len(sequences)} sequences could not be read and have "
              f"no results ({', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}); the "
              "metrics below cover the others", file=sys.stderr)
    sequences = [s for s in sequences if s.name in predicted]
    if sequences and not test_split:  # ground truth on every frame
        ours = tracking.evaluate_results(sequences, predicted)
        stay = tracking.evaluate_results(
            sequences, {s.name: np.repeat(s.boxes[:1], len(s), axis=0) for s in sequences})
        for name, r in (("tracker", ours), ("stay on the first box", stay)):
            print(f"{name}: AUC {r['auc']:.3f}  precision@20px {r['precision']:.3f}  "
                  f"normalised precision {r['normalized_precision']:.3f}  AO {r['ao']:.3f}  "
                  f"SR0.5 {r['sr50']:.3f}  SR0.75 {r['sr75']:.3f}")
        plot = tracking.success_plot({"MixFormer": np.asarray(ours["success_curve"]),
                                      "stay on the first box": np.asarray(stay["success_curve"])},
                                     os.path.join(out, "success.png"))
        print(f"success plot: {plot}")
    if frames:
        print(f"{frames / seconds:.1f} frames/s (compilation excluded; frame reading too)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
