"""The train step's matrix multiplies alone, side by side: XLA:CPU's two GEMM paths (Eigen, what
polyformer runs, and YNNPACK, jax's default) against numpy's BLAS and PyTorch's (TORCH_PY), on
the shapes of the peers' configs (forward, input gradient and weight gradient of every
projection; tokens = batch x seq rows). The smallest reproducer of the part of the CPU gap that
is the matmul kernels themselves. Prints, never asserts.

    [TORCH_PY=<torch venv>/bin/python] python bench/gemm.py [--configs a,b] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"a": dict(d=256, ff=1024, tokens=8 * 512), "b": dict(d=512, ff=2048, tokens=8 * 256)}
# backend -> (python, XLA_FLAGS): Eigen is polyformer's setting (attention/_xla_env.py)
XLA = {"xla (Eigen)": "--xla_cpu_experimental_ynn_fusion_type=",
       "xla (YNNPACK)": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}


def shapes(cfg: dict) -> list[tuple[str, int, int, int, str]]:
    """(name, M, K, N, layout) of one layer's GEMMs; layout "nn": A [M, K] B [K, N], "nt": B
    given as [N, K] (input gradient: dY W^T), "tn": A given as [K, M] (weight gradient X^T dY)."""
    d, ff, t = cfg["d"], cfg["ff"], cfg["tokens"]
    return [("q/k/v/o fwd", t, d, d, "nn"), ("fc fwd", t, d, ff, "nn"),
            ("proj fwd", t, ff, d, "nn"), ("fc dX", t, ff, d, "nt"),
            ("proj dX", t, d, ff, "nt"), ("q/k/v/o dX", t, d, d, "nt"),
            ("fc dW", d, t, ff, "tn"), ("proj dW", ff, t, d, "tn"), ("q/k/v/o dW", d, t, d, "tn")]


def _time(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(backend: str, cfg: dict, reps: int) -> dict:
    """{shape name: GFLOP/s} for one backend, in this process."""
    out = {}
    if backend.startswith("xla"):
        import jax
        import jax.numpy as jnp

        for name, m, k, n, lay in shapes(cfg):
            a = jnp.ones((k, m) if lay == "tn" else (m, k), jnp.float32)
            b = jnp.ones((n, k) if lay == "nt" else (k, n), jnp.float32)
            f = jax.jit({"nn": lambda a, b: a @ b, "nt": lambda a, b: a @ b.T,
                         "tn": lambda a, b: a.T @ b}[lay])
            out[name] = 2 * m * k * n / _time(lambda: f(a, b).block_until_ready(), reps) / 1e9
    elif backend == "numpy":
        import numpy as np

        for name, m, k, n, lay in shapes(cfg):
            a = np.ones((k, m) if lay == "tn" else (m, k), np.float32)
            b = np.ones((n, k) if lay == "nt" else (k, n), np.float32)
            A = a.T if lay == "tn" else a
            B = b.T if lay == "nt" else b
            out[name] = 2 * m * k * n / _time(lambda: A @ B, reps) / 1e9
    else:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        for name, m, k, n, lay in shapes(cfg):
            a = torch.ones((k, m) if lay == "tn" else (m, k))
            b = torch.ones((n, k) if lay == "nt" else (k, n))
            A = a.t() if lay == "tn" else a
            B = b.t() if lay == "nt" else b
            out[name] = 2 * m * k * n / _time(lambda: torch.mm(A, B), reps) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="a,b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backend", help=argparse.SUPPRESS)  # one measurement, in a subprocess
    a = ap.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.threads])
    if a.backend:
        print(json.dumps({c: measure(a.backend, CONFIGS[c], a.reps)
                          for c in a.configs.split(",")}))
        return
    sys.path.insert(0, ROOT)
    from trainer import perf

    runs = [(name, sys.executable, flags) for name, flags in XLA.items()]
    runs.append(("numpy (its BLAS)", sys.executable, ""))
    tpy = os.environ.get("TORCH_PY")
    if tpy:
        runs.append(("torch (MKL / oneDNN)", tpy, ""))
    else:
        print("TORCH_PY is not set: no torch column", file=sys.stderr)
    results = {}
    for name, python, flags in runs:
        env = dict(os.environ, XLA_FLAGS=flags) if flags else dict(os.environ)
        backend = "xla" if name.startswith("xla") else name.split()[0]
        p = subprocess.run([python, os.path.abspath(__file__), f"--backend={backend}",
                            f"--configs={a.configs}", f"--threads={a.threads}",
                            f"--reps={a.reps}"], capture_output=True, text=True, env=env)
        try:
            results[name] = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"{name}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
    info = perf.machine()
    t = perf.torch_matmul_peak(tpy, a.threads) if tpy else None
    if t:
        info["torch_matmul_gflops"] = round(t["gflops"], 1)
    print(perf.machine_line(info) + f"; {a.threads} threads, median of {a.reps}\n")
    names = list(results)
    print("| config | GEMM | M x K x N (layout) | " + " | ".join(f"{n} GFLOP/s" for n in names)
          + " |\n|---|---|---|" + "---|" * len(names))
    for c in a.configs.split(","):
        for name, m, k, n, lay in shapes(CONFIGS[c]):
            print(f"| {c} | {name} | {m} x {k} x {n} ({lay}) | "
                  + " | ".join(f"{results[b][c][name]:.0f}" for b in names) + " |")
        # the layer's GEMM time at each backend's rates (q/k/v/o counts 4 times)
        for b in names:
            total = sum((4 if nm.startswith("q/k/v/o") else 1) * 2 * m * k * n
                        / results[b][c][nm] / 1e9 for nm, m, k, n, _ in shapes(CONFIGS[c]))
            results[b][c]["_layer_ms"] = total * 1e3
        print(f"| {c} | one layer's GEMMs, ms | | " + " | ".join(
            f"{results[b][c]['_layer_ms']:.1f}" for b in names) + " |")


if __name__ == "__main__":
    main()
