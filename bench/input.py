"""Does data.num_workers help an input-bound run? The tiny ViT trained on an ImageFolder of
larger PNG photos-like images (each decoded, randomly cropped and resized to 32 px per example,
so decoding dominates the step) with 0 and with N Grain worker processes, side by side in one
run, alternating, `--reps` times each; prints images/s (median over the timed steps of the
trainer's own log) and the ratio. Same batches either way (the losses are printed to show it).

    python bench/input.py [--workers 2] [--size 384] [--images 800] [--steps 40] [--reps 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_folder(root: str, size: int, images: int) -> None:
    """`images` noisy RGB PNGs of size x size px over 8 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        d = os.path.join(root, f"class{i % 8}")
        os.makedirs(d, exist_ok=True)
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((8, 8, 1), np.uint8))  # blocks, then noise: PNG must work
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:05d}.png"))


def run(root: str, workdir: str, workers: int, steps: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "trainer.main", "--config=configs/vit.py:tiny",
           f"--workdir={workdir}", f"--config.data.paths={root}", "--config.model.num_classes=8",
           "--config.data.image_size=32", "--config.model.patch_size=8",
           f"--config.train.steps={steps}", "--config.train.global_batch_size=32",
           "--config.train.log_every=1", "--config.eval.every=0", "--config.eval.batches=1",
           "--config.checkpoint.every=0", f"--config.data.num_workers={workers}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"run failed ({workers} workers):\n{out.stderr[-2000:]}")
    rates = [float(x) for x in re.findall(r"images/s=([\d.]+)", out.stdout)]
    losses = re.findall(r"step \d+/\d+ .*?loss=([\d.]+)", out.stdout)
    timed = rates[len(rates) // 4:]  # after compilation and the workers' start
    return statistics.median(timed), float(losses[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    from trainer.perf import _cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "images")
        write_folder(root, a.size, a.images)
        results = {0: [], a.workers: []}
        loss = {}
        for rep in range(a.reps):
            for w in (0, a.workers):
                rate, loss[w] = run(root, os.path.join(tmp, f"run_{w}_{rep}"), w, a.steps)
                results[w].append(rate)
    print(f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"ViT tiny (32 px, batch 32) on {a.images} PNGs of {a.size} px, {a.steps} steps, "
          f"median images/s after the first quarter, {a.reps} alternating runs each\n")
    print("| data.num_workers | images/s (each run) | median | vs 0 | final loss |")
    print("|---|---|---|---|---|")
    base = statistics.median(results[0])
    for w, rates in results.items():
        m = statistics.median(rates)
        print(f"| {w} | {', '.join(f'{r:.0f}' for r in rates)} | {m:.0f} | {m / base:.2f}x | "
              f"{loss[w]:.4f} |")


if __name__ == "__main__":
    main()
