"""fwd+bwd time of gated linear attention (chunkwise, impl="xla") against softmax attention
(`jax.nn.dot_product_attention`, causal) and the GLA token-by-token recurrence, side by side in
one run, across sequence lengths. B=1, H=4, head dim 64, f32 on this machine's default backend.
Each time is the best of --reps calls after a warm-up, over --rounds passes (on a shared machine
noise only adds time; calls that take seconds get fewer reps and one pass). Prints, never
asserts.

    python bench/attention.py [--lengths 1024,2048,4096,8192,16384] [--reps 5] [--rounds 3]
    python bench/attention.py --pallas   # also the Pallas kernels (on a GPU / TPU)

Targets (issue 4): GLA grows linearly (T x2 -> time <= x2.3); at T = 8k GLA is >= 3x faster than
softmax and >= 10x faster than the recurrence.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import time_one  # noqa: E402

from attention.ops.gla import gla  # noqa: E402

B, H, D = 1, 4, 64
BUDGET_S = 20.0  # per mechanism and length: softmax at 16k takes ~25 s a call


def fwd_bwd(fn):
    """jit(grad of sum(fn(q, k, v, g) * cotangent)) with respect to every input."""
    def loss(q, k, v, g, cot):
        return jnp.sum(fn(q, k, v, g) * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


MECHANISMS = {
    "gla (xla)": lambda q, k, v, g: gla(q, k, v, g, impl="xla")[0],
    "softmax (dot_product_attention)": lambda q, k, v, g: jax.nn.dot_product_attention(
        q, k, v, is_causal=True),
    "gla recurrence (reference)": lambda q, k, v, g: gla(q, k, v, g, impl="reference")[0],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over all mechanisms; each time is the best over the passes "
                         "(calls over 1 s are timed in the first pass only)")
    ap.add_argument("--pallas", action="store_true", help="also time impl='pallas'")
    a = ap.parse_args()
    mechanisms = dict(MECHANISMS)
    if a.pallas:
        mechanisms["gla (pallas)"] = lambda q, k, v, g: gla(q, k, v, g, impl="pallas")[0]
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; fwd+bwd, B={B} H={H} "
          f"head dim {D}, f32, best of {a.reps} calls x {a.rounds} passes (fewer for calls over "
          f"{BUDGET_S / a.reps:.0f} s)")
    results = {m: {} for m in mechanisms}
    def inputs(T):
        ks = jax.random.split(jax.random.key(T), 5)
        q, k, v = (jax.random.normal(ks[i], (B, T, H, D)) for i in range(3))
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D))) / 16
        return q, k, v, g, jax.random.normal(ks[4], (B, T, H, D))

    # mechanism by mechanism, softmax last: its GB-sized score matrices leave the allocator and
    # the VM's memory reclaim busy for seconds, which slowed whatever ran next by up to 1.5x.
    # Several passes, the best of each: this machine's speed drifts by 20-50% over minutes.
    compiled, data = {}, {T: inputs(T) for T in lengths}
    for rnd in range(a.rounds):
        for name in sorted(mechanisms, key=lambda m: m.startswith("softmax")):
            for T in lengths:
                if rnd and results[name][T] > 1.0:
                    continue
                f = compiled.setdefault((name, T), fwd_bwd(mechanisms[name]))
                t = time_one(f, data[T], a.reps, best=True, budget_s=BUDGET_S)
                results[name][T] = min(t, results[name].get(T, t))
    print("\n| T | " + " | ".join(f"{m} ms" for m in mechanisms) + " | softmax / gla | recurrence / gla |")
    print("|---" * (len(mechanisms) + 3) + "|")
    gla_t = results["gla (xla)"]
    for T in lengths:
        row = " | ".join(f"{results[m][T] * 1e3:,.1f}" for m in mechanisms)
        print(f"| {T} | {row} | {results['softmax (dot_product_attention)'][T] / gla_t[T]:.1f}x "
              f"| {results['gla recurrence (reference)'][T] / gla_t[T]:.1f}x |")
    growth = [gla_t[b] / gla_t[a_] for a_, b in zip(lengths, lengths[1:])]
    print("\ngla (xla) time ratio per doubling of T: " + ", ".join(f"{x:.2f}" for x in growth)
          + " (target <= 2.3)")


if __name__ == "__main__":
    main()
