"""The Pallas kernels and the trainer on one GPU, in one script (target: < 8 min on one H100;
not yet run on a GPU): writes
bench/results/gpu.md (or --out). Prints, never asserts; exits 1 if a kernel check fails.

    python bench/gpu.py             # on a GPU: the shapes below
    python bench/gpu.py --tiny      # anywhere (CPU: the kernels in interpret mode), tiny shapes:
                                    # what the test suite runs (tests/test_bench_gpu.py)

(a) Checks: every kernel with impl="pallas" against its plain reference (GLA: the token-by-token
    recurrence; block-sparse: the dense masked softmax), forward and the gradients of q, k, v
    (and the gates), f32 and bf16, on odd shapes; a kernel without a lowering for this backend
    is reported as such.
(b) Timing, forward + backward, bf16, H = 16 heads of 128: GLA (impl="pallas" and "xla") against
    jax.nn.dot_product_attention (cuDNN flash attention on GPU, causal) at T = 2k, 8k, 16k, 32k
    (B = 4, 2, 1, 1); block-sparse attention at 10% of the causal blocks (impl="pallas" and
    "xla") against dense causal attention at 8k and 32k. Goals (issue 28): GLA >= 3x
    flash attention at 16k; block-sparse at 10% >= 5x dense at 32k.
(c) The default LM (configs/lm.py:default) trained for 50 steps through the Trainer: tokens/s,
    MFU (model FLOPs) and HFU (compiled FLOPs) against the chip's datasheet peak.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import attention  # noqa: E402,F401  (XLA flags before jax starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attention.ops.block_sparse import (BlockMask, block_sparse_attention,  # noqa: E402
                                        block_sparse_reference)
from attention.ops.gla import gla, gla_reference  # noqa: E402

F32_TOL, BF16_TOL = 2e-3, 4e-2  # max |kernel - reference| / max |reference|
FULL = dict(gla=[(4, 2048), (2, 8192), (1, 16384), (1, 32768)], sparse=[8192, 32768], heads=16,
            dim=128, block=128, steps=50, variant="default", check_t=(200, 333), check_dim=64,
            check_block=50)
TINY = dict(gla=[(1, 128)], sparse=[256], heads=2, dim=16, block=32, steps=4, variant="tiny",
            check_t=(45,), check_dim=16, check_block=24)


def scaled_error(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _random(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------- (a) checks
def check_gla(t: int, dim: int, dtype) -> dict:
    B, H = 2, 3
    ks = jax.random.split(jax.random.key(t), 5)
    q, k = (_random(ks[i], (B, t, H, dim), dtype) for i in (0, 1))
    v = _random(ks[2], (B, t, H, dim + 8), dtype)
    log_g = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, H, dim)))
    do = _random(ks[4], (B, t, H, dim + 8), dtype)

    def run(impl):
        f = (lambda *a: gla(*a, impl="pallas")[0]) if impl == "pallas" else (
            lambda q, k, v, g: gla_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                             v.astype(jnp.float32), g,
                                             scale=dim ** -0.5)[0])
        o, vjp = jax.vjp(f, q, k, v, log_g)
        return (o,) + vjp(do.astype(o.dtype))

    return _compare("gla", (t, dim), dtype, jax.jit(lambda: run("pallas")),
                    jax.jit(lambda: run("reference")), ("o", "dq", "dk", "dv", "dlog_g"))


def check_block_sparse(t: int, dim: int, dtype, block: int) -> dict:
    B, H, Hkv = 1, 4, 2
    ks = jax.random.split(jax.random.key(t + 1), 4)
    q = _random(ks[0], (B, t, H, dim), dtype)
    k, v = (_random(key, (B, t, Hkv, dim), dtype) for key in ks[1:3])
    do = _random(ks[3], (B, t, H, dim), dtype)
    n = -(-t // block)
    rng = np.random.default_rng(t)
    dense = (rng.random((B, H, n, n)) < 0.5) | np.eye(n, dtype=bool)
    mask = BlockMask.from_dense(jnp.asarray(dense), block, block, q_len=t, k_len=t)

    def run(impl):
        f = (lambda q, k, v: block_sparse_attention(q, k, v, mask, causal=True, impl="pallas")) \
            if impl == "pallas" else (lambda q, k, v: block_sparse_reference(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask,
                causal=True, scale=dim ** -0.5)[0])
        o, vjp = jax.vjp(f, q, k, v)
        return (o,) + vjp(do.astype(o.dtype))

    return _compare("block_sparse", (t, dim, block), dtype, jax.jit(lambda: run("pallas")),
                    jax.jit(lambda: run("reference")), ("o", "dq", "dk", "dv"))


def _compare(kernel, shape, dtype, kernel_fn, reference_fn, names) -> dict:
    row = {"kernel": kernel, "shape": shape, "dtype": jnp.dtype(dtype).name}
    try:
        got = kernel_fn()
    except NotImplementedError as e:  # no lowering for this backend
        return dict(row, status="no kernel", detail=str(e).split(";")[0][:120])
    except Exception as e:  # a lowering or runtime error: reported, the other rows still run
        return dict(row, status="FAIL", detail=f"{type(e).__name__}: {str(e)[:200]}".replace(
            "|", "/").replace("\n", " "))
    ref = reference_fn()
    errors = {n: scaled_error(g, r) for n, g, r in zip(names, got, ref)}
    tol = F32_TOL if jnp.dtype(dtype) == jnp.float32 else BF16_TOL
    worst = max(errors, key=errors.get)
    return dict(row, status="ok" if errors[worst] <= tol else "FAIL",
                detail=f"worst {worst} {errors[worst]:.1e} (tol {tol:.0e})")


# ----------------------------------------------------------------------------- (b) timing
def _or_nan(run) -> float:
    """run() (seconds), or nan with the error printed: one failing path (an out-of-memory at
    32k, a lowering error) leaves the rest of the table."""
    try:
        return run()
    except Exception as e:
        print(f"timing failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan")


def timed(fn, *args, reps: int) -> float:
    """Median seconds of fn(*args) (jitted, compiled and warmed first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(attend, n_args: int):
    """jit of the gradients of sum(attend(...) * do) w.r.t. its first n_args inputs."""
    def loss(*a):
        *xs, do = a
        return jnp.sum(attend(*xs).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def _dense(q, k, v):
    # cuDNN asked for by name on GPU (the baseline; an error if this jax cannot run it),
    # where attention.ops.causal's "dense" lets XLA choose
    on_gpu = jax.default_backend() == "gpu"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation="cudnn" if on_gpu else None)


def time_gla(cases, heads: int, dim: int, reps: int) -> list[dict]:
    rows = []
    for B, T in cases:
        ks = jax.random.split(jax.random.key(T), 4)
        x = lambda key: _random(key, (B, T, heads, dim), jnp.bfloat16)  # noqa: E731
        q, k, v, do = (x(key) for key in ks)
        log_g = -jax.nn.softplus(jax.random.normal(ks[0], (B, T, heads, dim)))
        t = {impl: _or_nan(lambda impl=impl: timed(_fwd_bwd(
            lambda q, k, v, g: gla(q, k, v, g, impl=impl)[0], 4), q, k, v, log_g, do, reps=reps))
             for impl in ("pallas", "xla")}
        t_dense = _or_nan(lambda: timed(_fwd_bwd(_dense, 3), q, k, v, do, reps=reps))
        rows.append({"B": B, "T": T, "pallas_ms": t["pallas"] * 1e3, "xla_ms": t["xla"] * 1e3,
                     "dense_ms": t_dense * 1e3, "speedup": t_dense / np.nanmin(list(t.values()))})
    return rows


def time_block_sparse(lengths, heads: int, dim: int, block: int, reps: int,
                      density: float = 0.1) -> list[dict]:
    rows = []
    for T in lengths:
        n = T // block
        rng = np.random.default_rng(T)
        causal = np.tril(np.ones((n, n), bool))
        keep = causal & (rng.random((1, heads, n, n)) < density)
        keep |= np.eye(n, dtype=bool)  # the diagonal block: every row sees a key
        mask = BlockMask.from_dense(jnp.asarray(keep), block, block, q_len=T, k_len=T)
        ks = jax.random.split(jax.random.key(T), 4)
        q, k, v, do = (_random(key, (1, T, heads, dim), jnp.bfloat16) for key in ks)
        t = {impl: _or_nan(lambda: timed(_fwd_bwd(lambda q, k, v: block_sparse_attention(
                 q, k, v, mask, causal=True, impl=impl), 3), q, k, v, do, reps=reps))
             for impl in ("pallas", "xla")}
        t_dense = _or_nan(lambda: timed(_fwd_bwd(_dense, 3), q, k, v, do, reps=reps))
        rows.append({"T": T, "density": float(keep.sum() / (heads * causal.sum())),
                     "pallas_ms": t["pallas"] * 1e3, "xla_ms": t["xla"] * 1e3,
                     "dense_ms": t_dense * 1e3, "speedup": t_dense / np.nanmin(list(t.values()))})
    return rows


# ----------------------------------------------------------------------------- (c) training
def train_lm(variant: str, steps: int) -> dict:
    from trainer.cli import load_config
    from trainer.trainer import Trainer

    config = load_config(os.path.join(ROOT, "configs", "lm.py") + f":{variant}", [
        f"train.steps={steps}", f"train.log_every={max(steps // 5, 1)}", "eval.every=0",
        "eval.batches=1", "checkpoint.every=0"])
    with tempfile.TemporaryDirectory() as tmp, Trainer(config, os.path.join(tmp, "run")) as t:
        t.fit()
        metrics = t.last_train["metrics"]
    return {"variant": variant, "steps": steps, "tokens_per_s": metrics["perf/tokens/s"],
            "mfu": metrics["perf/mfu"], "hfu": metrics["perf/hfu"], "loss": metrics["loss"]}


# ----------------------------------------------------------------------------- report
def report(device: str, checks, gla_rows, sparse_rows, train) -> str:
    out = [f"# GPU kernels and training: {device}", "",
           f"jax {jax.__version__}, backend {jax.default_backend()}", "",
           "## Kernel checks (impl='pallas' against the plain reference, forward + backward)", "",
           "| kernel | shape | dtype | status | detail |", "|---|---|---|---|---|"]
    out += [f"| {c['kernel']} | {c['shape']} | {c['dtype']} | {c['status']} | {c['detail']} |"
            for c in checks]
    out += ["", "## GLA against dense causal attention (fwd + bwd, bf16)", "",
            "| B | T | GLA pallas ms | GLA xla ms | dense ms | dense / best GLA |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['B']} | {r['T']} | {r['pallas_ms']:.2f} | {r['xla_ms']:.2f} | "
            f"{r['dense_ms']:.2f} | {r['speedup']:.2f}x |" for r in gla_rows]
    out += ["", "## Block-sparse attention against dense causal attention (fwd + bwd, bf16)", "",
            "| T | active blocks (of causal) | pallas ms | xla ms | dense ms | dense / best sparse |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['T']} | {r['density']:.0%} | {r['pallas_ms']:.2f} | {r['xla_ms']:.2f} | "
            f"{r['dense_ms']:.2f} | {r['speedup']:.2f}x |" for r in sparse_rows]
    out += ["", "## Training (Trainer.fit)", "",
            "| variant | steps | tokens/s | MFU | HFU | last loss |", "|---|---|---|---|---|---|",
            f"| {train['variant']} | {train['steps']} | failed: {train['error']} ||||" if "error"
            in train else f"| {train['variant']} | {train['steps']} | {train['tokens_per_s']:,.0f} | "
            f"{train['mfu']:.1%} | {train['hfu']:.1%} | {train['loss']:.3f} |", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU: interpret mode)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; 2 tiny)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu.md"))
    a = ap.parse_args(argv)
    s = TINY if a.tiny else FULL
    reps = a.reps or (2 if a.tiny else 10)
    device = jax.devices()[0]
    name = f"{device.device_kind} ({device.platform})"
    t0 = time.perf_counter()
    checks = [check_gla(t, s["check_dim"], dtype) for t in s["check_t"]
              for dtype in (jnp.float32, jnp.bfloat16)]
    checks += [check_block_sparse(t, s["check_dim"], dtype, s["check_block"])
               for t in s["check_t"] for dtype in (jnp.float32, jnp.bfloat16)]
    print(f"checks done ({time.perf_counter() - t0:.0f} s)", flush=True)
    gla_rows = time_gla(s["gla"], s["heads"], s["dim"], reps)
    sparse_rows = time_block_sparse(s["sparse"], s["heads"], s["dim"], s["block"], reps)
    print(f"timing done ({time.perf_counter() - t0:.0f} s)", flush=True)
    try:
        train = train_lm(s["variant"], s["steps"])
    except Exception as e:  # the tables above still get written
        train = {"variant": s["variant"], "steps": s["steps"],
                 "error": f"{type(e).__name__}: {str(e)[:200]}"}
    text = report(name, checks, gla_rows, sparse_rows, train)
    text += f"\nwall time {time.perf_counter() - t0:.0f} s\n"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 1 if any(c["status"] == "FAIL" for c in checks) or "error" in train else 0


if __name__ == "__main__":
    sys.exit(main())
