"""polyformer's trainer beside the peer GPTs of ../shared/peers (PyTorch eager, torch.compile, plain
JAX + NNX), on the same model, side by side in one run. Prints, never asserts.

    TORCH_PY=<torch venv>/bin/python python bench/peer.py [--reps 3] [--configs a,b,default]
        [--peers ../shared/peers]
    python bench/peer.py --impl polyformer --layers 4 --d_model 256 --heads 4 --seq 512 --batch 8

The second form is one run of polyformer, printing one JSON line in the peers' format
(tokens_per_s = batch*seq / median step time, step_ms_*, params, flops_per_step_est, first_step_s,
loss_first/last). It trains configs/lm.py:peer_a's architecture (LayerNorm, tanh GELU, learned
positions, tied head, MHA; the peers' exact parameter count) with the shapes given, through
`Trainer.fit` (its whole loop: Grain input, global batch assembly, metrics every step, like the
peers' loss.item()), on the embedded corpus rather than random bytes. A step's time is the
trainer's own perf/step_s with log_every=1; the first `--warmup` steps are not counted.

The first form alternates the implementations (order reversed every repetition) using the peers'
runner (bench.py in the peers' folder, --peers, default $POLYFORMER_PEERS or ../shared/peers:
quiet-machine wait, foreign-CPU accounting) and prints the median table; without TORCH_PY the
torch rows are skipped (set-up: the peers' README.md). It first prints the machine (CPU model,
vector ISA, cores) and both frameworks' f32 2048^2 matmul peaks, measured at the start and the
end of the run; MFU = the peers' analytic FLOPs / step time / the best peak of the row's own
framework (jax's for the JAX rows, torch's for the torch rows).
Config "default" is polyformer's default LM (configs/lm.py:default) against its PyTorch twin,
bench/torch_lm.py (same architecture and parameter count; no plain-JAX peer exists for it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("POLYFORMER_PEERS") or os.path.join(os.path.dirname(ROOT), "shared", "peers")
PEER_FILES = ("bench.py", "jax_gpt.py", "torch_gpt.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("polyformer",), default=None,
                   help="one run of polyformer (else: the side-by-side comparison)")
    p.add_argument("--variant", default="peer_a",
                   help="with --impl: configs/lm.py variant; peer_a takes the shapes below, "
                        "default (the default LM) runs as configured")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (incl. compile)")
    p.add_argument("--threads", type=int, default=2, help="cores (CPU affinity), as the peers")
    p.add_argument("--peers", default=PEERS,
                   help="the peers' folder (bench.py, jax_gpt.py, torch_gpt.py); default "
                        "$POLYFORMER_PEERS or ../shared/peers beside this checkout")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--configs", default="a,b")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--wait-quiet", type=float, default=0.2,
                   help="before each run wait until other processes use <= this many cores")
    p.add_argument("--max-wait", type=float, default=600)
    p.add_argument("overrides", nargs="*", help="config overrides for polyformer, e.g. "
                                                "train.compute_dtype=bfloat16")
    return p.parse_args(argv)


def run_polyformer(a) -> dict:
    try:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.threads])
    except (AttributeError, OSError):
        pass
    sys.path.insert(0, ROOT)
    import attention  # noqa: F401  (XLA:CPU flags before jax starts)
    import flax
    import jax
    import optax

    from trainer.cli import load_config
    from trainer.trainer import Trainer

    shapes = [f"model.num_layers={a.layers}", f"model.d_model={a.d_model}",
              f"model.num_heads={a.heads}", f"model.num_kv_heads={a.heads}",
              f"model.mlp_dim={4 * a.d_model}", f"model.max_len={a.seq}",
              f"data.seq_len={a.seq}", f"train.global_batch_size={a.batch}"]
    overrides = [*(shapes if a.variant.startswith("peer") else []),
                 f"train.steps={a.warmup + a.steps}", "train.log_every=1", "eval.every=0",
                 "eval.batches=1", "checkpoint.every=0", "checkpoint.async_save=false",
                 "sample.max_new_tokens=0", *a.overrides]
    config = load_config(os.path.join(ROOT, "configs", f"lm.py:{a.variant}"), overrides)
    with tempfile.TemporaryDirectory() as workdir:
        # the trainer's log lines go to stderr: stdout carries only the JSON line
        with contextlib.redirect_stdout(sys.stderr), Trainer(config, workdir) as trainer:
            trainer.fit()
            n_params = trainer.num_params()
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    train = [r for r in rows if "train/perf/step_s" in r or "train/loss" in r]
    times = [r["train/perf/step_s"] for r in train if r.get("step", 0) > a.warmup
             and "train/perf/step_s" in r]
    losses = [r["train/loss"] for r in train if "train/loss" in r]
    m, seq = config.model, config.data.seq_len
    med, tokens = statistics.median(times), config.train.global_batch_size * seq
    # the peers' analytic FLOPs: 6 N tokens + 12 L d T tokens, N without the position embedding
    n_pos = m.max_len * m.d_model if m.position == "learned" else 0
    flops = 6 * (n_params - n_pos) * tokens + 12 * m.num_layers * m.d_model * seq * tokens
    return {
        "impl": "polyformer", "tokens_per_s": round(tokens / med, 1),
        "step_ms_median": round(med * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2), "params": n_params,
        "flops_per_step_est": flops, "gflops_per_s_est": round(flops / med / 1e9, 2),
        "first_step_s": None, "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4), "overrides": a.overrides,
        "variant": a.variant, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
    }


def check_peers(path: str) -> str:
    """The peers' folder, absolute; exits naming what is missing where it is not usable."""
    path = os.path.abspath(path)
    missing = [f for f in PEER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        sys.exit(f"bench/peer.py: the peers' folder {path} "
                 f"{'does not exist' if not os.path.isdir(path) else 'lacks ' + ', '.join(missing)}"
                 f": the side-by-side comparison runs the peer GPTs from there. Pass "
                 f"--peers <folder with {', '.join(PEER_FILES)}> (or set POLYFORMER_PEERS); "
                 f"polyformer alone runs without them: bench/peer.py --impl polyformer")
    return path


def peaks(tpy: str | None, threads: int) -> dict:
    """Both frameworks' f32 2048^2 matmul GFLOP/s now, each in its own process (no jax threads
    held here during the runs)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                          "import os; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))"
                          "[:int(sys.argv[2])]); from trainer import perf; "
                          "print(json.dumps(perf.machine()))", ROOT, str(threads)],
                         capture_output=True, text=True)
    try:
        m = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit(f"bench/peer.py: measuring jax's matmul peak failed:\n{out.stderr[-2000:]}")
    if tpy:
        sys.path.insert(0, ROOT)
        from trainer.perf import torch_matmul_peak
        t = torch_matmul_peak(tpy, threads)
        if t:
            m["torch_matmul_gflops"], m["torch"] = round(t["gflops"], 1), t["torch"]
    return m


def compare(a) -> None:
    peers = check_peers(a.peers)
    sys.path.insert(0, peers)
    from bench import CONFIGS, run, wait_quiet  # the peers' bench.py

    tpy = os.environ.get("TORCH_PY")
    variants = []
    if tpy:
        variants.append(("torch", [tpy, "torch_gpt.py"]))
        if not a.no_compile:
            variants.append(("torch+compile", [tpy, "torch_gpt.py", "--compile"]))
    else:
        print(f"TORCH_PY is not set: torch rows skipped ({peers}/README.md sets it up)",
              file=sys.stderr)
    variants.append(("jax peer", [sys.executable, "jax_gpt.py"]))
    variants.append(("polyformer", [sys.executable, os.path.abspath(__file__),
                                    "--impl=polyformer", *a.overrides]))
    # "default": polyformer's default LM against its PyTorch twin (bench/torch_lm.py)
    twin = os.path.join(ROOT, "bench", "torch_lm.py")
    default_variants = [(v, [tpy, twin] + c[2:]) for v, c in variants if v.startswith("torch")]
    default_variants.append(("polyformer", [sys.executable, os.path.abspath(__file__),
                                            "--impl=polyformer", "--variant=default",
                                            *a.overrides]))
    sys.path.insert(0, ROOT)
    from trainer.perf import machine_line

    wait_quiet(a.wait_quiet, a.max_wait)
    start = peaks(tpy, a.threads)
    print(machine_line(start) + "  [start of run]", flush=True)
    results = []
    for rep in range(a.reps):
        for cname in a.configs.split(","):
            flags = [f"--steps={a.steps}", f"--warmup={a.warmup}", f"--threads={a.threads}"]
            if cname == "default":
                chosen = default_variants
            else:
                chosen = variants
                flags += [f"--{k}={v}" for k, v in CONFIGS[cname].items()]
            for vname, cmd in (chosen if rep % 2 == 0 else chosen[::-1]):
                quiet = wait_quiet(a.wait_quiet, a.max_wait)
                d = run(cmd + flags)  # runs in the peers' folder; records foreign_cpu
                d.update(variant=vname, cfg=cname, rep=rep, quiet_before=quiet)
                print(json.dumps(d), flush=True)
                results.append(d)
    wait_quiet(a.wait_quiet, a.max_wait)
    end = peaks(tpy, a.threads)
    print(machine_line(end) + "  [end of run]", flush=True)
    best = {"jax": max(start["jax_matmul_gflops"], end["jax_matmul_gflops"]),
            "torch": max(start.get("torch_matmul_gflops", 0), end.get("torch_matmul_gflops", 0))}
    best_info = dict(start, jax_matmul_gflops=best["jax"],
                     torch_matmul_gflops=best["torch"] or None)
    print(f"\n{machine_line(best_info)} (best of start and end); {a.threads} threads, "
          f"{a.reps} repetitions")
    print("\n| config | impl | params | tokens/s, median of reps (min-max) | step ms "
          "| est. GFLOP/s | MFU (own framework's peak) | / torch eager | max foreign cpu |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cname in a.configs.split(","):
        med = {}
        chosen = default_variants if cname == "default" else variants
        for vname, _ in chosen:
            rs = [r for r in results if r["cfg"] == cname and r["variant"] == vname
                  and "tokens_per_s" in r]
            if rs:
                med[vname] = statistics.median(r["tokens_per_s"] for r in rs)
        for vname, _ in chosen:
            rs = [r for r in results if r["cfg"] == cname and r["variant"] == vname
                  and "tokens_per_s" in r]
            if not rs:
                err = [r.get("error", "") for r in results if r["cfg"] == cname
                       and r["variant"] == vname]
                print(f"| {cname} | {vname} | FAILED: {(err or [''])[0][-120:]!r} |||||||")
                continue
            tps = [r["tokens_per_s"] for r in rs]
            ms = statistics.median(r["step_ms_median"] for r in rs)
            vs = f"{med[vname] / med['torch']:.2f}x" if "torch" in med else "-"
            gflops = rs[0]["flops_per_step_est"] / ms / 1e6
            peak = best["torch" if vname.startswith("torch") else "jax"]
            mfu = f"{gflops / peak:.0%}" if peak else "-"
            print(f"| {cname} | {vname} | {rs[0]['params']:,} | **{med[vname]:,.0f}** "
                  f"({min(tps):,.0f}-{max(tps):,.0f}) | {ms:,.0f} "
                  f"| {gflops:.1f} | {mfu} | {vs} "
                  f"| {max(r.get('foreign_cpu', 0) for r in rs):.2f} |")


def main() -> None:
    a = parse_args()
    if a.impl == "polyformer":
        print(json.dumps(run_polyformer(a)), flush=True)
    else:
        compare(a)


if __name__ == "__main__":
    main()
