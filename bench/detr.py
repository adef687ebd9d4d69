"""Plain DETR convergence on the embedded shapes scenes, with and without BoxRPB.

configs/detr.py:tiny (64x64 images, 1-3 squares / circles, 2 classes, d 64, 2+2 layers, 10
queries, batch 32, lr 1e-3 held high, train augmentation flip only, two 3x3 convolutions per
backbone stage) and :tiny_no_rpb (plain global cross-attention), each trained for --steps with
COCO evaluation (pycocotools, 256 held-out images) every --every steps. Prints the AP50 / AP
curve of both; too slow for CI (~8-14 minutes a run on a 2-core CPU shared with other jobs,
~150 ms/step). The gate (FAMILIES.md D): tiny's AP50 >= 0.6 at step 4000; measured 0.432 /
0.681 / 0.839 / 0.887 (AP 0.700 at 4000) at steps 1000..4000, tiny_no_rpb 0.200 / 0.400 /
0.579 / 0.673. configs/detr.py lists what the recipe needs.

    python bench/detr.py [--steps 4000] [--every 1000] [--variants tiny,tiny_no_rpb] [--set f=v]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import Trainer, load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def curve(variant: str, steps: int, every: int, overrides=()) -> tuple[dict[int, dict], float, float]:
    """{step: eval metrics} of one run, its seconds per step and wall seconds."""
    config = load_config(os.path.join(ROOT, f"configs/detr.py:{variant}"), [
        f"train.steps={steps}", f"eval.every={every}", "checkpoint.every=0",
        f"train.log_every={every}", *overrides])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        # not quiet: the Reporter writes metrics.jsonl (its terminal lines go to /dev/null)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
                Trainer(config, d) as t:
            result = t.fit()
        evals = {}
        with open(os.path.join(d, "metrics.jsonl")) as f:  # eval lines carry eval/ keys
            for line in f:
                row = json.loads(line)
                if "eval/AP" in row:
                    evals[row["step"]] = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
    return evals, result["metrics"]["perf/step_s"], time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--variants", default="tiny,tiny_no_rpb")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every run (repeatable)")
    args = p.parse_args(argv)
    rows = {}
    for v in args.variants.split(","):
        evals, step_s, wall = curve(v, args.steps, args.every, args.set)
        rows[v] = evals
        print(f"{v}: {step_s * 1e3:.0f} ms/step, {wall / 60:.1f} min", flush=True)
    steps = sorted({s for e in rows.values() for s in e})
    print("COCO AP50 / AP on 256 held-out scenes")
    print("| config | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for v, evals in rows.items():
        cells = [f"{evals[s]['AP50']:.3f} / {evals[s]['AP']:.3f}" if s in evals else "-"
                 for s in steps]
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
