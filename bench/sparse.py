"""Block-sparse attention, side by side in one run. Prints, never asserts.

Part 1 (kernel): time of block_sparse_attention (impl="xla", causal) at a given block density
against dense causal softmax (`jax.nn.dot_product_attention`), forward and forward+backward,
B=1, H=4, head dim 64, f32, blocks of 64.

Part 2 (quality, --workdir of a trained softmax LM, e.g. `configs/lm.py:long` -> runs/lm_long):
the training-free prefill methods (HiP, FlexPrefill, DHSA) load the same parameters and run the
eval split at the model's context through mode="prefill"; prints eval loss against dense and the
attention cost: (query, key) pairs computed, dense causal / method.

    python bench/sparse.py [--lengths 4096,8192,16384] [--density 0.1] [--reps 3]
    python bench/sparse.py --part quality --workdir runs/lm_long [--batches 4] [--train_steps N]
    python bench/sparse.py --pallas     # also impl="pallas" (on a TPU)

`make bench` runs both parts at reduced lengths (--part all, training the LM first when its
workdir has no checkpoint) and puts the output in README.md between `<!-- bench:sparse -->`
markers.

Targets (issue 5): at 8k, 10% density is >= 4x faster than dense; HiP / FlexPrefill / DHSA keep
eval loss within 2% of dense at >= 3x lower attention cost.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attention  # noqa: E402,F401  (XLA:CPU flags before jax starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import time_one  # noqa: E402
from trainer import perf  # noqa: E402

from attention.ops.block_sparse import BlockMask, block_sparse_attention, causal_blocks  # noqa: E402

B, H, D, BLOCK = 1, 4, 64, 64
# the prefill methods at their paper defaults, at budgets near 3x below dense at 2k, and a control:
# HiP with no selected blocks (sinks + window only) shows how much the eval task needs retrieval
DEFAULT_METHODS = ";".join([
    "hip", "hip:hip_mask_k=128,hip_window=128",
    "flexprefill:flex_block=64", "flexprefill:flex_block=64,flex_gamma=0.3,flex_min_budget=128",
    "dhsa", "dhsa:dhsa_topk=128,dhsa_window=128",
    "landmark:landmark_every=64,landmark_inference=standard,landmark_top_k=4",
    "hip:hip_mask_k=0,hip_window=128",
])


def density_mask(T: int, density: float, seed: int = 0) -> BlockMask:
    """A causal block mask with `density` of all NQ x NK blocks active: the diagonal block of every
    query block, the rest drawn at random below the diagonal (same count for every row where it
    fits, so the work is balanced as in a top-k selection; the first rows have fewer causal blocks,
    so the measured density printed next to the timings is a little lower)."""
    n = T // BLOCK
    per_row = max(math.ceil(density * n), 1)
    scores = jax.random.uniform(jax.random.key(seed), (n, n))
    below = causal_blocks(n, n, BLOCK, BLOCK)
    scores = jnp.where(jnp.eye(n, dtype=bool), 2.0, jnp.where(below, scores, -1.0))
    top = jax.lax.top_k(scores, per_row)[1]                     # [n, per_row]
    valid = jnp.take_along_axis(below, top, axis=-1)
    top = jnp.where(valid, top, -1)
    return BlockMask.from_indices(top[None, None], n, BLOCK, BLOCK, q_len=T, k_len=T)


def kernel_part(a):
    impls = ["xla"] + (["pallas"] if a.pallas else [])
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; B={B} H={H} head dim {D}, f32, "
          f"blocks {BLOCK}, block density {a.density}, causal, median of {a.reps}")
    rows = []
    for T in [int(x) for x in a.lengths.split(",")]:
        ks = jax.random.split(jax.random.key(T), 4)
        q, k, v, cot = (jax.random.normal(ks[i], (B, T, H, D)) for i in range(4))
        mask = density_mask(T, a.density)
        fns = {"dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)}
        for impl in impls:
            fns[f"sparse {impl}"] = (lambda impl: lambda q, k, v: block_sparse_attention(
                q, k, v, mask, causal=True, impl=impl))(impl)
        res = {}
        for name, fn in fns.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, c, fn=fn: jnp.sum(fn(q, k, v) * c),
                                    argnums=(0, 1, 2)))
            res[name] = (time_one(fwd, (q, k, v), a.reps), time_one(grad, (q, k, v, cot), a.reps))
        rows.append((T, float(mask.density()[0, 0]), res))
    names = list(rows[0][2])
    print("\n| T | density | " + " | ".join(f"{n} fwd ms | {n} fwd+bwd ms" for n in names)
          + " | " + " | ".join(f"dense / {n} fwd | dense / {n} fwd+bwd" for n in names[1:]) + " |")
    print("|---" * (2 + 2 * len(names) + 2 * (len(names) - 1)) + "|")
    for T, dens, res in rows:
        cells = [f"{res[n][0] * 1e3:,.1f} | {res[n][1] * 1e3:,.1f}" for n in names]
        ratios = [f"{res['dense'][0] / res[n][0]:.1f}x | {res['dense'][1] / res[n][1]:.1f}x"
                  for n in names[1:]]
        print(f"| {T} | {dens:.3f} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("kernel", "quality", "all"), default="kernel")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pallas", action="store_true", help="also time impl='pallas'")
    ap.add_argument("--workdir", default="runs/lm_long", help="a trained softmax LM (quality part)")
    ap.add_argument("--batches", type=int, default=4, help="eval batches (quality part)")
    ap.add_argument("--train_steps", type=int, default=0,
                    help="quality part: train configs/lm.py:long this many steps into --workdir "
                         "first if it has no checkpoint (0: require one)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="';'-separated `name[:field=value,...]` (quality part)")
    a = ap.parse_args()
    print(perf.machine_line())
    if a.part in ("kernel", "all"):
        kernel_part(a)
    if a.part in ("quality", "all"):
        from bench.sparse_quality import quality_part
        quality_part(a)


if __name__ == "__main__":
    main()
