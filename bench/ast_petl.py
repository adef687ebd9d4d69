"""AST and parameter-efficient transfer on the synthetic clips, side by side in one run.
Prints, never asserts.

    python bench/ast_petl.py [--steps 0] [--adapt_steps 0] [--methods full,linear,...]

(Not bench/ast.py: a script folder holding `ast.py` shadows the standard library's `ast` for
every script run from it.)

1. `configs/ast.py:tiny`: an AST trained from scratch on all 8 synthetic classes (target: >= 95%
   held-out accuracy).
2. `:pretrain`: the same on the 4 tonal classes; its backbone is then frozen.
3. One row per PETL method (`configs/ast.py:<method>`): the pretrained run adapted to the 4
   other classes (noise-like and modulated sounds) with the same budget (steps, batch);
   `init_from` the pretrained run, only the method's parameters train. Target: adapters >= 10
   points above the linear probe at < 5% trainable parameters.
Plus `scratch`: the transfer classes learned from random initialisation with the same budget,
and the tiny AST from scratch with each of --attentions (linear attention in the encoder: GLA
read both ways, Hedgehog unmasked) beside the softmax one. --parts picks what runs.
Accuracy: top-1 on the held-out fold (40 clips per class); steps/s: the trainer's own (the
last logged interval: compile, eval and checkpoints excluded).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.timing import bench_config  # noqa: E402
from trainer import Trainer, perf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("linear", "bitfit", "adapter", "adapter_seq", "conformer", "lora", "prompt", "full")


def train(variant: str, workdir: str, steps: int, overrides=()) -> dict:
    c = bench_config(f"configs/ast.py:{variant}", steps, overrides)
    t0 = time.perf_counter()
    with Trainer(c, workdir, quiet=True) as t:
        result = t.fit()
        return {"steps": c.train.steps, "batch": c.train.global_batch_size,
                "steps_s": 1 / result["metrics"]["perf/step_s"],
                "accuracy": result["eval"]["accuracy"], "params": t.num_params(),
                "trained": t.num_trainable(), "share": t.trainable_share(),
                "classes": len(t.task.data()[2]), "wall_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0, help="from-scratch steps (0: the config's)")
    ap.add_argument("--adapt_steps", type=int, default=0, help="PETL steps (0: the config's)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--attentions", default="gla,hedgehog",
                    help="tiny rows with these encoder attentions (model.attention)")
    ap.add_argument("--parts", default="scratch,attention,petl",
                    help="scratch: the tiny AST; attention: --attentions rows; petl: pretrain, "
                         "scratch on the transfer classes and every --methods row")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(perf.machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "scratch" in parts:
            rows.append(("tiny (scratch, 8 classes)", train("tiny", f"{tmp}/tiny", a.steps)))
        if "attention" in parts:
            for name in filter(None, a.attentions.split(",")):
                rows.append((f"tiny, {name} attention (scratch, 8 classes)", train(
                    "tiny", f"{tmp}/tiny_{name}", a.steps, [f"model.attention={name}"])))
        if "petl" in parts:
            src = f"{tmp}/pretrain"
            rows.append(("pretrain (scratch, 4 tonal)", train("pretrain", src, a.steps)))
            # the transfer task from random initialisation, at the adaptation budget
            rows.append(("scratch (transfer classes)", train(
                "full", f"{tmp}/scratch", a.adapt_steps, ["init_from=", "init_from_skip="])))
            for method in filter(None, a.methods.split(",")):
                rows.append((method, train(method, f"{tmp}/{method}", a.adapt_steps,
                                           [f"init_from={src}"])))
    print("\n| run | classes | steps x batch | trainable params (share) | eval accuracy | "
          "steps/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['classes']} | {r['steps']} x {r['batch']} | {r['trained']:,} "
              f"({r['share']:.2%}) | {r['accuracy']:.1%} | {r['steps_s']:.1f} | "
              f"{r['wall_s']:.0f} |")
    print("\nPETL rows: the pretrain row's backbone, frozen, adapted to the 4 transfer classes "
          "(chance 25%)")


if __name__ == "__main__":
    main()
