"""Trainer throughput vs a minimal hand-written jitted loop of the same model, side by side.

For each LM config variant: tokens/s and HFU of the Trainer's step (its whole loop: Grain
input, global-array assembly, metrics), and of a bare loop (same model, same optax optimizer,
one jitted step over pre-made device batches, state donated). Runs alternate, repeated; the
printed ratios are medians. HFU = XLA cost_analysis FLOPs of the compiled step (what the
hardware ran, elementwise work included; the Trainer's MFU counts the model's) / step time /
the f32 2048x2048 matmul peak measured in this run. It first prints the machine (CPU model,
vector ISA, cores) and the matmul peaks, PyTorch's too where TORCH_PY names a torch venv's
python. Prints, never asserts.

    [TORCH_PY=<torch venv>/bin/python] python bench/train.py [--variants tiny,default]
        [--steps 20] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from trainer import Trainer, load_config, perf  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(variant, steps, overrides=()):
    return load_config(os.path.join(ROOT, f"configs/lm.py:{variant}"), [
        f"train.steps={steps}", f"train.log_every={steps}", "eval.every=0", "eval.batches=1",
        "checkpoint.every=0", "sample.max_new_tokens=0", "checkpoint.async_save=false",
        *overrides])


def run_trainer(config) -> float:
    """Seconds per step of Trainer.fit's loop (its own timing: steps 2..N, compile excluded)."""
    with tempfile.TemporaryDirectory() as d, Trainer(config, d, quiet=True) as t:
        result = t.fit()
        return result["metrics"]["perf/step_s"], t.step_flops


def bare_step(config):
    """(step, state, batches): the simplest jitted donated train step of the config's model and
    optimizer, its initial state and 4 pre-made device batches of random tokens."""
    from models.lm import LMTask

    task = LMTask(config)
    model = task.build_model(nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    gd_model, _, _ = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, tokens):
        m = nnx.merge(gd_model, params, rest)
        return task.loss(m, {"tokens": tokens})[0]

    def step(state, tokens):
        m, opt = nnx.merge(graphdef, state)
        _, params, rest = nnx.split(m, nnx.Param, ...)
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
        opt.update(m, grads)
        return nnx.state((m, opt)), loss

    rng = np.random.default_rng(0)
    b, t = config.train.global_batch_size, config.data.seq_len
    batches = [jnp.asarray(rng.integers(0, 256, (b, t + 1), dtype=np.int32)) for _ in range(4)]
    return jax.jit(step, donate_argnums=0), state, batches


def run_bare(config, steps: int) -> float:
    """Seconds per step of the simplest jitted loop of the same model and optimizer."""
    step, state, batches = bare_step(config)
    state, loss = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps - 1):
        state, loss = step(state, batches[i % 4])
    jax.block_until_ready((state, loss))
    return (time.perf_counter() - t0) / (steps - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="tiny,default")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0: 300 tiny / 15 others)")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    peak0 = perf.measure_cpu_matmul()
    info = perf.machine(peak0)
    tpy = os.environ.get("TORCH_PY")
    torch_peak = perf.torch_matmul_peak(tpy) if tpy else None
    if torch_peak:
        info["torch_matmul_gflops"] = round(torch_peak["gflops"], 1)
    print(perf.machine_line(info) + " [start of run]")
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} device(s)")
    rows = []
    for variant in a.variants.split(","):
        steps = a.steps or (300 if variant == "tiny" else 15)
        config = config_for(variant, steps)
        tokens = config.train.global_batch_size * config.data.seq_len
        tr, bare, flops = [], [], float("nan")
        for rep in range(a.reps):
            order = ("trainer", "bare") if rep % 2 == 0 else ("bare", "trainer")
            for which in order:
                if which == "trainer":
                    s, flops = run_trainer(config)
                    tr.append(s)
                else:
                    bare.append(run_bare(config, steps))
        rows.append((variant, tokens, flops, statistics.median(tr), statistics.median(bare),
                     [b / t for t, b in zip(tr, bare)]))
    peak1 = perf.measure_cpu_matmul()
    peak = max(peak0, peak1)
    print(f"jax's f32 2048^2 matmul peak at the end of the run {peak1 / 1e9:.1f} GFLOP/s; HFU uses "
          f"the best, {peak / 1e9:.1f}, on {info['cpu']} ({'/'.join(info['isa'])}, "
          f"{info['cores']} cores)\n")
    print("| variant | tokens/step | GFLOP/step (XLA) | Trainer tokens/s | bare loop tokens/s | "
          "Trainer / bare (median of per-rep ratios) | Trainer HFU | bare HFU |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, tokens, flops, t, b, ratios in rows:
        print(f"| {variant} | {tokens} | {flops / 1e9:.2f} | {tokens / t:,.0f} | {tokens / b:,.0f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
              f"{flops / t / peak:.1%} | {flops / b / peak:.1%} |")
    print("\nTrainer overhead = 1 - Trainer/bare; target under 5%.")


if __name__ == "__main__":
    main()
