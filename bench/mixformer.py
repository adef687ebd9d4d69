"""MixFormer on the embedded moving-shapes sequences: a short CPU training run, then tracking.

Trains configs/mixformer.py:tiny (stage 1: the box) and :score (stage 2: the score head only,
from stage 1), then tracks the held-out sequences with the online loop (models/mixformer/track.py) and
prints: success AUC, precision, AO of the tracker against the "stay on the first box" baseline,
the score head's AUROC on positive / negative crops, and tracking frames/s. Prints, never
asserts; targets (issue 11): AUC >= 0.5 and >= 0.2 above the baseline, AUROC >= 0.9.

    python bench/mixformer.py [--steps 5000] [--score_steps 1000] [--sequences 20]
                              [--set data.center_jitter=1.0 ...]

Tracks twice: with the online template update (the config's track.*) and with the initial
template only ("no update"), which separates the box head from the score head's gating.
Measured (2-core CPU, two runs at once, defaults): seed 0: eval IoU 0.723, AUC 0.567 (no
update 0.566) vs 0.196, AUROC 0.922; --set seed=1: eval IoU 0.733, AUC 0.535 (0.536), AUROC
0.907 (README "MixFormer" has the history).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from models.mixformer import tracking  # noqa: E402
from trainer import Trainer, load_config  # noqa: E402
from models.mixformer.track import OnlineTracker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--score_steps", type=int, default=1000)
    p.add_argument("--sequences", type=int, default=20)
    p.add_argument("--set", action="append", default=[],
                   help="a config override for both stages (key=value), repeatable")
    p.add_argument("--set1", action="append", default=[],
                   help="a config override for stage 1 only (key=value), repeatable")
    p.add_argument("--thresholds", default="",
                   help="comma-separated track.score_threshold values to track with as well")
    p.add_argument("--workdir", default="",
                   help="keep the two runs here (<workdir>/box, <workdir>/score); default: a "
                        "temporary folder")
    args = p.parse_args(argv)
    cfg = os.path.join(ROOT, "configs/mixformer.py")
    keep = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with keep as d:
        start = time.perf_counter()
        stage1 = load_config(f"{cfg}:tiny", [f"train.steps={args.steps}", "checkpoint.every=0",
                                             "eval.every=0", *args.set, *args.set1])
        with Trainer(stage1, os.path.join(d, "box"), quiet=True) as t:
            r1 = t.fit()
        stage2 = load_config(f"{cfg}:score", [f"train.steps={args.score_steps}",
                                              "checkpoint.every=0", "eval.every=0",
                                              f"init_from={os.path.join(d, 'box')}", *args.set])
        with Trainer(stage2, os.path.join(d, "score"), quiet=True) as t:
            r2 = t.fit()
            model = t.model
            sequences = t.task.sequences(stage2.data.eval_split)[:args.sequences]
        train_min = (time.perf_counter() - start) / 60
        tracker = OnlineTracker(model, stage2)
        tracker.run(sequences[0])  # compile
        start, frames, predicted = time.perf_counter(), 0, {}
        for seq in sequences:
            predicted[seq.name] = tracker.run(seq)
            frames += len(seq) - 1
        fps = frames / (time.perf_counter() - start)
        fixed = OnlineTracker(model, stage2, update=False)
        runs = {"tracker, no template update": {seq.name: fixed.run(seq) for seq in sequences}}
        for th in filter(None, args.thresholds.split(",")):
            with stage2.unlocked():
                stage2.track.score_threshold = float(th)
            other = OnlineTracker(model, stage2)
            runs[f"tracker, score_threshold {float(th):g}"] = {
                seq.name: other.run(seq) for seq in sequences}
    with contextlib.redirect_stdout(io.StringIO()):
        ours = tracking.evaluate_results(sequences, predicted)
        runs = {k: tracking.evaluate_results(sequences, v) for k, v in runs.items()}
        stay = tracking.evaluate_results(
            sequences, {s.name: np.repeat(s.boxes[:1], len(s), axis=0) for s in sequences})
    print(f"MixFormer tiny (d {stage1.model.d_model}, {stage1.model.num_layers} layers, template "
          f"{stage1.model.template_size} px, search {stage1.model.search_size} px): stage 1 "
          f"{args.steps} steps (eval IoU {r1['eval']['iou']:.3f}), stage 2 {args.score_steps} "
          f"steps; {train_min:.1f} min of training on this CPU"
          + (f"; overrides {' '.join(args.set + args.set1)}" if args.set + args.set1 else ""))
    print(f"| {len(sequences)} held-out sequences | AUC | precision@20px | norm. precision | AO | "
          f"SR0.5 |")
    print("|---|---|---|---|---|---|")
    for name, r in (("tracker", ours), *runs.items(), ("stay on the first box", stay)):
        print(f"| {name} | {r['auc']:.3f} | {r['precision']:.3f} | "
              f"{r['normalized_precision']:.3f} | {r['ao']:.3f} | {r['sr50']:.3f} |")
    print(f"score head AUROC (positive / negative crops): {r2['eval']['score_auroc']:.3f}; "
          f"tracking {fps:.0f} frames/s")


if __name__ == "__main__":
    main()
