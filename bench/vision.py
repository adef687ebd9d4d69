"""Vision families on CPU, side by side in one run: ViT-tiny and iFormer-tiny train steps
(images/s, HFU), their held-out accuracy on the embedded shapes after a fixed budget, and EP vs
linear probing (accuracy, probe parameters) on the same frozen backbone; the video family's
STDHA against frame averaging of the same backbone on the moving shapes. Prints, never asserts.

    python bench/vision.py [--families vit,iformer,video] [--steps 0] [--probe_steps 0]

Each image family: its configs/<family>.py:tiny trained from scratch (steps: the config's unless
--steps), then :probe_ep and :probe_linear initialised from that run (init_from) with only the
probe trained (train.trainable="^probe"). video: configs/video.py:tiny (STDHA) and :frame_avg
(softmax attention: each frame alone, the classifier averaging them), both from scratch with
the same budget, then :from_vit (STDHA on the vit row's trained image ViT, its classifier new)
when vit ran too; the "images/s" column counts clips of data.num_frames frames. Images/s and step time are the Trainer's own
(perf/images/s, perf/step_s of the last logged interval: compile, eval and checkpoints
excluded); HFU = XLA cost_analysis FLOPs of the compiled step (what the hardware ran) / step time / the f32 2048 matmul
peak measured in this run. Accuracy: top-1 on the held-out shapes (data.num_eval images).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.timing import bench_config  # noqa: E402
from trainer import Trainer, perf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(family: str, variant: str, workdir: str, steps: int, overrides=()) -> dict:
    """One run through Trainer.fit; its figures."""
    c = bench_config(f"configs/{family}.py:{variant}", steps, overrides)
    t0 = time.perf_counter()
    with Trainer(c, workdir, quiet=True) as t:
        result = t.fit()
        params = nnx.state(t.model, nnx.Param)
        trained = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(params)
                      if p[0] == ("probe" if c.model.probe else p[0]))
        return {"steps": c.train.steps, "batch": c.train.global_batch_size,
                "images_s": result["metrics"][f"perf/{t.task.throughput_unit}/s"],
                "step_s": result["metrics"]["perf/step_s"], "flops": t.step_flops,
                "accuracy": result["eval"]["accuracy"], "params": t.num_params(),
                "trained": trained, "wall_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="vit,iformer,video")
    ap.add_argument("--steps", type=int, default=0, help="backbone steps (0: the config's)")
    ap.add_argument("--probe_steps", type=int, default=0, help="probe steps (0: the config's)")
    a = ap.parse_args()

    peak0 = perf.measure_cpu_matmul()
    print(perf.machine_line(perf.machine(peak0)) + "  [start of run]")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            src = os.path.join(tmp, f"{family}_tiny")
            rows.append((family, "tiny", train(family, "tiny", src, a.steps)))
            if family == "video":  # the baseline STDHA has to beat, not probes
                rows.append((family, "frame_avg", train(family, "frame_avg",
                                                        os.path.join(tmp, "video_avg"), a.steps)))
                vit = os.path.join(tmp, "vit_tiny")
                if os.path.isdir(vit):  # ZeroI2V's use: the image ViT of this run's vit row
                    rows.append((family, "from_vit", train(
                        family, "from_vit", os.path.join(tmp, "video_from_vit"), a.steps,
                        [f"init_from={vit}"])))
                continue
            for probe in ("probe_ep", "probe_linear"):
                rows.append((family, probe, train(family, probe, os.path.join(tmp, probe + family),
                                                  a.probe_steps, [f"init_from={src}"])))
    peak = max(peak0, perf.measure_cpu_matmul())
    print(f"HFU against the best matmul peak of the run, {peak / 1e9:.1f} GFLOP/s; chance "
          f"accuracy 1/8 = 12.5% (8 shape kinds; video: 8 motion classes, where a model blind "
          f"to frame order, frame averaging, is at most 50%)\n")
    print("| family | variant | steps x batch | params (trained) | images/s | ms/step | "
          "GFLOP/step (XLA) | HFU | eval accuracy | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family, variant, r in rows:
        print(f"| {family} | {variant} | {r['steps']} x {r['batch']} | {r['params']:,} "
              f"({r['trained']:,}) | {r['images_s']:,.0f} | {r['step_s'] * 1e3:.1f} | "
              f"{r['flops'] / 1e9:.3f} | {r['flops'] / r['step_s'] / peak:.1%} | "
              f"{r['accuracy']:.1%} | {r['wall_s']:.0f} |")
    print("\nprobes: the backbone of the family's tiny row, frozen; trained = the probe's "
          "parameters (tiny rows: all); video tiny: STDHA, frame_avg: softmax attention on each "
          "frame (the same parameters), images/s = clips/s")


if __name__ == "__main__":
    main()
