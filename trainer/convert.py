"""Hugging Face checkpoints in and out: `python -m trainer.convert import-hf HF_DIR RUN_DIR`,
`python -m trainer.convert export-hf RUN_DIR HF_DIR [--step N] [--architecture NAME]`.

Reads a Hugging Face model directory (config.json plus model.safetensors, or the shards named
by model.safetensors.index.json) and writes a polyformer run directory: the config saved with
an Orbax checkpoint at step 0, which `load_checkpoint(RUN_DIR)`, `--config.init_from=RUN_DIR`
and `python -m trainer.main --config=RUN_DIR/config.py --workdir=RUN_DIR` (training on from
step 0; the config file reads the run's config, RUN_DIR/polyformer_config.json) all accept.
`--config.<field>=...` after the two paths sets fields of the run (its data, steps, ...).

A family maps the architectures it can hold (its Task's `hf_importers`: trainer/hf.py
HFImporter, the config of an HF config and for every parameter the HF tensor and its layout);
this module finds the family, reads the files and fills a fresh run's state tensor by tensor,
each placed straight into its sharding. export-hf writes a run's parameters back in the
architecture's names and layouts (float32) with its config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import numpy as np
from flax import nnx

from trainer.api import load_checkpoint
from trainer.checkpoint import path_name
from trainer.cli import apply_overrides
from trainer.config import ConfigError, to_json
from trainer.hf import HFImporter, hf_tensors, write_safetensors
from trainer.task import all_tasks, get_task
from trainer.trainer import Trainer


def importer_for(hf_config: dict) -> tuple[str, HFImporter]:
    """(architecture, importer) of an HF config.json, from the families that declare one."""
    supported = {arch: imp for task in all_tasks()
                 for arch, imp in task.__dict__.get("hf_importers", {}).items()}
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in supported:
        raise ConfigError(f"import-hf: architecture {arch!r} is not supported; supported: "
                          f"{', '.join(sorted(supported))}")
    return arch, supported[arch]


# ----------------------------------------------------------------------------- import
def import_hf(hf_dir: str, run_dir: str, overrides=()) -> str:
    """Writes run_dir (its config and a checkpoint at step 0) from the HF model in hf_dir;
    returns run_dir. `overrides`: config fields to set as well (e.g. the run's data.paths)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"import-hf: {hf_dir!r} has no config.json (a Hugging Face model "
                          "directory holds config.json and model.safetensors)")
    with open(path) as f:
        hf_config = json.load(f)
    arch, importer = importer_for(hf_config)
    config = apply_overrides(importer.config(hf_config), list(overrides))
    tensors = hf_tensors(hf_dir)
    mapping = importer.tensors(config)
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(
            os.path.join(run_dir, "checkpoints")):
        raise ConfigError(f"import-hf: {run_dir!r} already holds checkpoints; import into a new "
                          "directory")
    # the model's label set is the checkpoint's, not the config's data's (match_data)
    with Trainer(config, run_dir, quiet=True, match_data=False) as trainer:
        state = trainer.initial_state()  # the optimizer state and step of a fresh run
        params = {"nnx/0/" + "/".join(map(str, p)) for p, v in
                  nnx.to_flat_state(trainer.abstract_state.nnx[0]) if isinstance(v, nnx.Param)}
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        out, problems, used = [], [], set()
        for key, leaf in leaves:
            name = path_name(key)
            if name not in params:
                out.append(leaf)
                continue
            short = name[len("nnx/0/"):]
            if short not in mapping:
                if not (importer.ours_only and re.search(importer.ours_only, short)):
                    problems.append(f"{short}: no Hugging Face tensor maps to it")
                out.append(leaf)  # (ours_only: its initial value)
                continue
            hf_name, transform, _ = mapping[short]
            names = hf_name if isinstance(hf_name, tuple) else (hf_name,)  # (several: HFImporter)
            absent = [n for n in names if n not in tensors]
            if absent:
                problems.append(f"{short}: tensor {absent[0]!r} is not in {hf_dir}")
                out.append(leaf)
                continue
            used.update(names)
            shapes = " and ".join(str(tuple(tensors[n].header[n]["shape"])) for n in names)
            try:
                value = np.asarray(transform(*(tensors[n][n] for n in names)))
            except ValueError:  # a layout map that cannot take that shape (a reshape)
                value = None
            if value is None or value.shape != leaf.shape:
                problems.append(f"{short}: tensor {' + '.join(map(repr, names))} has shape "
                                f"{shapes}, which maps to "
                                f"{'nothing' if value is None else value.shape}; this model "
                                f"needs {leaf.shape}")
                out.append(leaf)
                continue
            out.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
        unused = sorted(n for n in tensors if n not in used and not any(
            n.endswith(s) for s in importer.ignored))
        problems += [f"tensor {n!r} of {hf_dir} maps to no parameter" for n in unused]
        if problems:
            raise ConfigError(f"import-hf: {hf_dir} ({arch}) does not match the model its config "
                              "builds:\n  " + "\n  ".join(problems[:20])
                              + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                                 else ""))
        trainer.state = jax.tree_util.tree_unflatten(treedef, out)
        trainer.save()
        trainer.checkpoints.wait()
    # the run's config as a config file, so the CLI trains on with --config=RUN_DIR/config.py
    with open(os.path.join(run_dir, "polyformer_config.json"), "w") as f:
        f.write(to_json(config))
    with open(os.path.join(run_dir, "config.py"), "w") as f:
        f.write(RUN_CONFIG.format(source=os.path.abspath(hf_dir)))
    return run_dir


RUN_CONFIG = '''"""The config of a run imported from {source} (python -m trainer.convert import-hf):
python -m trainer.main --config=THIS_FILE --workdir=THIS_DIRECTORY trains on from step 0."""
import json
import os

from ml_collections import ConfigDict

from trainer.cli import finish_config


def get_config(variant=None):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "polyformer_config.json")) as f:
        return finish_config(ConfigDict(json.load(f)))
'''


def export_hf(run_dir: str, hf_dir: str, step: int | None = None,
              architecture: str | None = None) -> str:
    """Writes checkpoint `step` (default: the newest) of run_dir as a Hugging Face model
    directory (config.json + model.safetensors, float32) of `architecture`, by default the
    first of the family's that can express the run's model; returns hf_dir."""
    try:
        model, config = load_checkpoint(run_dir, step)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"export-hf: {e}") from None
    reasons = []
    importers = get_task(config.task).__dict__.get("hf_importers", {})
    if architecture is not None:
        if architecture not in importers:
            raise ConfigError(f"export-hf: --architecture={architecture!r}: a {config.task!r} "
                              f"run is written as {', '.join(importers) or 'nothing'}")
        importers = {architecture: importers[architecture]}
    for arch, importer in importers.items():
        try:
            hf_config = importer.hf_config(config)
            break
        except ConfigError as e:
            reasons.append(f"{arch}: {e}")
    else:
        raise ConfigError(f"export-hf: the {config.task!r} run in {run_dir} matches no Hugging "
                          f"Face architecture polyformer writes"
                          + (":\n  " + "\n  ".join(reasons) if reasons else ""))
    params = {"/".join(map(str, path)): np.asarray(v.get_value() if hasattr(v, "get_value")
                                                   else v.value)
              for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for name, (hf_name, _, to_hf) in importer.tensors(config).items():
        value = to_hf(params.pop(name))
        for n, v in zip(*((hf_name, value) if isinstance(hf_name, tuple) else
                          ((hf_name,), (value,)))):
            out[n] = np.ascontiguousarray(v, np.float32)
    if importer.ours_only:  # parameters the architecture has no place for (HFImporter)
        params = {k: v for k, v in params.items() if not re.search(importer.ours_only, k)}
    if params:
        raise ConfigError(f"export-hf: {arch} has no place for {', '.join(sorted(params))}")
    os.makedirs(hf_dir, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        if os.path.exists(os.path.join(hf_dir, name)):
            raise ConfigError(f"export-hf: {os.path.join(hf_dir, name)} exists; export into a "
                              "new directory")
    write_safetensors(os.path.join(hf_dir, "model.safetensors"), out)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(dict(hf_config, architectures=[arch], torch_dtype="float32"), f, indent=2,
                  sort_keys=True)
    return hf_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.convert",
                                description="Hugging Face checkpoints in and out.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF model directory -> polyformer run directory "
                                           "(then --config.<field>=... for the run)")
    imp.add_argument("hf_dir")
    imp.add_argument("run_dir")
    exp = sub.add_parser("export-hf", help="polyformer run directory -> HF model directory")
    exp.add_argument("run_dir")
    exp.add_argument("hf_dir")
    exp.add_argument("--step", type=int, default=None, help="the checkpoint (default: newest)")
    exp.add_argument("--architecture", default=None,
                     help="the Hugging Face architecture to write (default: the first of the "
                          "run's family that can hold it, e.g. ViTForImageClassification "
                          "before ViTModel)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in rest if args.command == "export-hf" or not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}" + (
            "; the run's config fields are set with --config.<field>=..."
            if args.command == "import-hf" else ""))
    try:
        if args.command == "export-hf":
            export_hf(args.run_dir, args.hf_dir, args.step, args.architecture)
            print(f"exported {args.run_dir} into {args.hf_dir} (config.json, model.safetensors)")
            return 0
        import_hf(args.hf_dir, args.run_dir, [a[len("--config."):] for a in rest])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.hf_dir} into {args.run_dir} (checkpoint 0); train on with "
          f"--config={args.run_dir}/config.py --workdir={args.run_dir}, or start a new run with "
          f"--config.init_from={args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
