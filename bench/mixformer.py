"""MixFormer on the embedded moving-shapes sequences: a short CPU training run, then tracking.

Trains configs/mixformer.py:tiny (stage 1: the box) and :score (stage 2: the score head only,
from stage 1), then tracks the held-out sequences with the online loop (trainer/track.py) and
prints: success AUC, precision, AO of the tracker against the "stay on the first box" baseline,
the score head's AUROC on positive / negative crops, and tracking frames/s. Prints, never
asserts; targets (issue 11): AUC >= 0.5 and >= 0.2 above the baseline, AUROC >= 0.9.

    python bench/mixformer.py [--steps 1500] [--score_steps 300] [--sequences 20]
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

from trainer import Trainer, load_config, tracking  # noqa: E402
from trainer.track import OnlineTracker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--score_steps", type=int, default=300)
    p.add_argument("--sequences", type=int, default=20)
    args = p.parse_args(argv)
    cfg = os.path.join(ROOT, "configs/mixformer.py")
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        stage1 = load_config(f"{cfg}:tiny", [f"train.steps={args.steps}", "checkpoint.every=0",
                                             "eval.every=0"])
        with Trainer(stage1, os.path.join(d, "box"), quiet=True) as t:
            r1 = t.fit()
        stage2 = load_config(f"{cfg}:score", [f"train.steps={args.score_steps}",
                                              "checkpoint.every=0", "eval.every=0",
                                              f"init_from={os.path.join(d, 'box')}"])
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
    with contextlib.redirect_stdout(io.StringIO()):
        ours = tracking.evaluate_results(sequences, predicted)
        stay = tracking.evaluate_results(
            sequences, {s.name: np.repeat(s.boxes[:1], len(s), axis=0) for s in sequences})
    print(f"MixFormer tiny (d {stage1.model.d_model}, {stage1.model.num_layers} layers, template "
          f"{stage1.model.template_size} px, search {stage1.model.search_size} px): stage 1 "
          f"{args.steps} steps (eval IoU {r1['eval']['iou']:.3f}), stage 2 {args.score_steps} "
          f"steps; {train_min:.1f} min of training on this CPU")
    print(f"| {len(sequences)} held-out sequences | AUC | precision@20px | norm. precision | AO | "
          f"SR0.5 |")
    print("|---|---|---|---|---|---|")
    for name, r in (("tracker", ours), ("stay on the first box", stay)):
        print(f"| {name} | {r['auc']:.3f} | {r['precision']:.3f} | "
              f"{r['normalized_precision']:.3f} | {r['ao']:.3f} | {r['sr50']:.3f} |")
    print(f"score head AUROC (positive / negative crops): {r2['eval']['score_auroc']:.3f}; "
          f"tracking {fps:.0f} frames/s")


if __name__ == "__main__":
    main()
