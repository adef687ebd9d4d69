"""Command line: python -m trainer.main --config=configs/lm.py:tiny --workdir=DIR [--config.a.b=v ...]

Every config field can be overridden with --config.<field>=<value>; configs are locked, so a
misspelt field fails with the list of valid ones. A rerun with the same workdir resumes.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m trainer.main",
        description="Train a polyformer model. Any config field: --config.<group>.<field>=<value>.")
    p.add_argument("--config", required=True, help="config file and variant, e.g. configs/lm.py:tiny")
    p.add_argument("--workdir", default=None,
                   help="checkpoints + TensorBoard logs; default runs/<config>_<variant>; "
                        "an existing workdir resumes")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop (with a checkpoint) at this step; a later run continues")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for a in rest:
        if not a.startswith("--config."):
            p.error(f"unrecognised argument {a!r}; config fields are set with --config.<field>=<value>")
        overrides.append(a[len("--config."):])
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # import after argument parsing: --help stays fast and bad flags fail before jax starts
    from trainer.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides)
        path, _, variant = args.config.partition(":")
        workdir = args.workdir or os.path.join(
            "runs", os.path.splitext(os.path.basename(path))[0] + (f"_{variant}" if variant else ""))
        from trainer.trainer import Trainer
        with Trainer(config, workdir) as trainer:
            result = trainer.fit(max_steps=args.max_steps)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = result.get("eval", {})
    summary = " ".join(f"{k}={v:.4g}" for k, v in ev.items())
    print(f"done: step {result['step']}, {summary}; checkpoints in {trainer.checkpoints.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
