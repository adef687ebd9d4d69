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
precision, AO, SR0.5 / SR0.75 against the ground truth where it exists, with a success plot
(<out>/success.png) beside the "stay on the first box" baseline, and frames/s.
"""
from __future__ import annotations

import os
import sys
import time

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

    def run(self, sequence):
        """sequence (models.mixformer.tracking.Sequence) -> predicted boxes [F, 4] xywh (frame 0 = GT)."""
        d, m, tr = self.config.data, self.config.model, self.config.track
        first = sequence.frame(0)
        H, W = first.shape[:2]
        box = np.asarray(sequence.boxes[0], np.float64)
        template, _ = tracking.crop(first, box, d.template_factor, m.template_size)
        slots = [template] * m.num_templates  # slot 0 stays the initial template
        cache = self._encode(self.state, np.stack(slots)[None])
        boxes = [box]
        best, candidate = -1.0, None
        for t in range(1, len(sequence)):
            frame = sequence.frame(t)
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
                cache = self._encode(self.state, np.stack(slots)[None])
                best, candidate = -1.0, None
        return np.stack(boxes)


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
            sequences = tracking.load_got10k(args.sequences, args.split, skip_bad=args.skip_bad)
        else:
            sequences = task.sequences(config.data.eval_split)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        sequences = sequences[:args.limit]
    out = args.out or os.path.join(args.source, "tracking")
    os.makedirs(out, exist_ok=True)
    tracker = OnlineTracker(model, config)
    predicted, frames, seconds, failed = {}, 0, 0.0, []
    for seq in tqdm(sequences, desc="tracking", unit="seq", file=sys.stdout,
                    disable=not sys.stdout.isatty()):
        start = time.perf_counter()
        try:
            boxes = tracker.run(seq)
        except BadExample as e:  # a frame that cannot be read: the other sequences go on
            print(f"error: sequence {seq.name!r} not tracked: {e}", file=sys.stderr)
            failed.append(seq.name)
            continue
        if seq is not sequences[0]:  # the first sequence includes compilation
            seconds += time.perf_counter() - start
            frames += len(seq) - 1
        tracking.write_result(os.path.join(out, f"{seq.name}.txt"), boxes)
        predicted[seq.name] = boxes
    print(f"tracked {len(predicted)} sequences with checkpoint {step} of {args.source}; "
          f"results in {out}")
    if failed:
        print(f"error: {len(failed)} of {len(sequences)} sequences could not be read and have "
              f"no results ({', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}); the "
              "metrics below cover the others", file=sys.stderr)
    sequences = [s for s in sequences if s.name in predicted]
    if sequences and all(len(s.boxes) == len(s) for s in sequences):  # ground truth everywhere
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
        print(f"{frames / seconds:.1f} frames/s (after the first sequence's compilation)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
