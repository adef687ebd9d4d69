"""TokenFormer progressive scaling at tiny scale: grown vs trained from scratch.

On the embedded corpus, with the same N steps and one warmup + cosine schedule over them:
  (a) the large model (2x the parameter tokens) from scratch for N steps;
  (b) the small model for N/2 steps, grown to the large one (zero tokens appended, optimizer
      state carried, step and schedule continuing: configs/tokenformer.py:grow's mechanism, as
      two stages), then N/2 more steps;
  (c) the small model for N steps (what growing buys over staying small).
Prints eval bits per byte and total training FLOPs (XLA cost analysis of each compiled train
step x its steps) of each; the paper's claim is (b) ~ (a) at lower cost. Prints, never asserts.

    python bench/tokenformer.py [--steps 800] [--eval_batches 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import Trainer, load_config  # noqa: E402
from trainer.stages import fit_stages  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL, LARGE = (64, 256), (128, 512)  # (param_tokens, ffn_param_tokens)


def config(steps: int, tokens, eval_batches: int, *extra):
    from attention.pattention import default_zoom
    n, n_ffn = tokens
    return load_config(os.path.join(ROOT, "configs/tokenformer.py:grow"), [
        "stages=()", f"model.param_tokens={n}", f"model.ffn_param_tokens={n_ffn}",
        # the default zooms at the model's own (initial) counts
        f"model.pattention_zoom={default_zoom('l2_norm_gelu', n)}",
        f"model.ffn_pattention_zoom={default_zoom('l2_norm_gelu', n_ffn)}",
        f"train.steps={steps}", f"train.schedule_steps={steps}", f"train.log_every={steps}",
        "checkpoint.every=0", "sample.max_new_tokens=0", f"eval.batches={eval_batches}", *extra])


def scratch(steps: int, tokens, eval_batches: int):
    with tempfile.TemporaryDirectory() as d, \
            Trainer(config(steps, tokens, eval_batches), d, quiet=True) as t:
        result = t.fit()
        return result["eval"]["bits_per_byte"], t.step_flops * steps, t.num_params()


def grown(steps: int, eval_batches: int):
    half = steps // 2
    c = config(steps, SMALL, eval_batches, "init_from_carry=params+optimizer+step")
    with c.unlocked():
        c.stages = ({"train.steps": half},
                    {"model.param_tokens": LARGE[0], "model.ffn_param_tokens": LARGE[1],
                     "train.steps": steps})
    with tempfile.TemporaryDirectory() as d:
        first, second = fit_stages(c, d, quiet=True)
    flops = first["step_flops"] * half + second["step_flops"] * (steps - half)
    return second["eval"]["bits_per_byte"], flops, second["growth"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval_batches", type=int, default=16)
    args = p.parse_args(argv)
    n = args.steps
    print(f"TokenFormer (2 layers, d_model 128, seq 128, batch 16) on the embedded corpus, "
          f"{n} steps, one cosine schedule; eval over {args.eval_batches} batches")
    large_bpb, large_flops, large_params = scratch(n, LARGE, args.eval_batches)
    grow_bpb, grow_flops, growth = grown(n, args.eval_batches)
    small_bpb, small_flops, small_params = scratch(n, SMALL, args.eval_batches)
    rows = [
        (f"(a) large {LARGE} from scratch, {n} steps", large_params, large_bpb, large_flops),
        (f"(b) small {SMALL} {n // 2} steps + grow + {n - n // 2}", growth["params_after"],
         grow_bpb, grow_flops),
        (f"(c) small {SMALL} from scratch, {n} steps", small_params, small_bpb, small_flops),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'run':<{w}}  {'params':>9}  {'eval bpb':>8}  {'train PFLOP':>11}  {'vs (a)':>6}")
    for name, params, bpb, flops in rows:
        print(f"{name:<{w}}  {params:>9,}  {bpb:>8.4f}  {flops / 1e15:>11.4f}  "
              f"{flops / large_flops:>6.2f}")
    print(f"growth at step {n // 2}: parameters {growth['params_before']:,} -> "
          f"{growth['params_after']:,}; loss on a fixed eval batch {growth['loss_before']:.6f} "
          f"before, {growth['loss_after']:.6f} after")


if __name__ == "__main__":
    main()
