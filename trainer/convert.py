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
import mmap
import os
import re
import shutil
import sys

import jax
import numpy as np
from flax import nnx

from attention.layers import LoRALinear

from trainer.api import load_checkpoint
from trainer.checkpoint import PARAMS, path_name, write_params_checkpoint
from trainer.cli import apply_overrides
from trainer.config import ConfigError, to_json
from trainer.hf import HFImporter, hf_tensors, write_safetensors
from trainer.task import all_tasks, get_task
from trainer.tokenizer import check_vocab, load_tokenizer
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
    stored = {name: name for name in tensors}  # our HF name -> its name in the file
    prefix = importer.base_prefix
    if prefix and not any(name.startswith(prefix) for name in tensors):
        stored = {prefix + name: name for name in tensors}  # saved from the bare base model
        tensors = {prefix + name: st for name, st in tensors.items()}
    mapping = importer.tensors(config)
    fused = {}  # HF tensor -> the parameters it holds, in the map's order (HFImporter)
    for ours, (hf_name, _, _) in mapping.items():
        fused.setdefault(hf_name, []).append(ours)
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(
            os.path.join(run_dir, "checkpoints")):
        raise ConfigError(f"import-hf: {run_dir!r} already holds checkpoints; import into a new "
                          "directory")
    copy_tokenizer(hf_dir, config, run_dir, overrides)
    # the model's label set is the checkpoint's, not the config's data's (match_data)
    with Trainer(config, run_dir, quiet=True, match_data=False) as trainer:
        params = {"/".join(map(str, p)) for p, v in
                  nnx.to_flat_state(trainer.abstract_state.nnx[0]) if isinstance(v, nnx.Param)}
        leaves = [(path_name(key), leaf) for key, leaf in
                  jax.tree_util.tree_flatten_with_path(trainer.abstract_state.nnx[0])[0]]
        leaves = [(name, leaf) for name, leaf in leaves if name in params]
        # parameters the architecture lacks keep their initial values (ours_only: e.g. ViTModel
        # has no classifier); only then is a fresh model built, once
        own = [name for name, _ in leaves if name not in mapping and importer.ours_only
               and re.search(importer.ours_only, name)]
        fresh = {}
        if own:
            fresh = {path_name(k)[len(PARAMS):]: v for k, v in
                     jax.tree_util.tree_flatten_with_path(trainer._fresh_state().as_dict())[0]
                     if path_name(k)[len(PARAMS):] in own}
    shapes = {name: leaf.shape for name, leaf in leaves}
    # first every check, from the files' headers only (nothing is written when one fails)
    plan, problems, used = [], [], set()
    for short, leaf in leaves:
        if short in fresh:
            plan.append((short, None, lambda v=fresh[short]: v, None, leaf))
            continue
        if short not in mapping:
            problems.append(f"{short}: no Hugging Face tensor maps to it")
            continue
        hf_name = mapping[short][0]
        names = hf_name if isinstance(hf_name, tuple) else (hf_name,)  # (several: HFImporter)
        absent = [n for n in names if n not in tensors]
        if absent:
            problems.append(f"{short}: tensor {absent[0]!r} is not in {hf_dir}")
            continue
        transform = mapping[fused[hf_name][0]][1]  # a fused tensor's: its first entry's
        used.update(names)
        held_shapes = " and ".join(str(tuple(tensors[n].header[stored[n]]["shape"]))
                                   for n in names)
        try:  # the shape it maps to, without reading (or, for a reshape, allocating) data
            value = transform(*(_placeholder(tensors[n].header[stored[n]]["shape"])
                                for n in names))
        except ValueError:  # a layout map that cannot take that shape (a reshape)
            value = None
        parts = [p for p in fused[hf_name] if p in shapes]
        need, held, start = leaf.shape, "", None
        if len(parts) > 1:  # a slice of a fused tensor
            need = leaf.shape[:-1] + (sum(shapes[p][-1] for p in parts),)
            held = f" (it holds {', '.join(parts)} on its last axis)"
            start = sum(shapes[p][-1] for p in parts[:parts.index(short)])
        if value is None or value.shape != need:
            problems.append(f"{short}: tensor {' + '.join(map(repr, names))} has shape "
                            f"{held_shapes}, which maps to "
                            f"{'nothing' if value is None else value.shape}; this model "
                            f"needs {need}{held}")
            continue
        plan.append((short, [(tensors[n], stored[n]) for n in names], transform, start, leaf))
    unused = sorted(n for n in tensors if n not in used and not any(
        n.endswith(s) for s in importer.ignored))
    problems += [f"tensor {stored[n]!r} of {hf_dir} maps to no parameter" for n in unused]
    if problems:
        raise ConfigError(f"import-hf: {hf_dir} ({arch}) does not match the model its config "
                          "builds:\n  " + "\n  ".join(problems[:20])
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                             else ""))
    # then tensor by tensor into a params-only checkpoint at step 0 (a run resumes it with a
    # fresh optimizer): the host holds one tensor at a time, never the model
    write_params_checkpoint(run_dir, 0, (
        (short, transform() if sources is None else
         _read_tensor(sources, transform, start, leaf.shape, leaf.dtype))
        for short, sources, transform, start, leaf in plan), to_json(config))
    # the run's config as a config file, so the CLI trains on with --config=RUN_DIR/config.py
    with open(os.path.join(run_dir, "polyformer_config.json"), "w") as f:
        f.write(to_json(config))
    with open(os.path.join(run_dir, "config.py"), "w") as f:
        f.write(RUN_CONFIG.format(source=os.path.abspath(hf_dir)))
    return run_dir


def _placeholder(shape) -> np.ndarray:
    """A float32 array of `shape` that occupies one element (all strides 0): a layout map
    applied to it gives the shape it maps to without reading or allocating a tensor."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=tuple(shape),
                                           strides=(0,) * len(shape))


def _file_mapping(a: np.ndarray) -> mmap.mmap | None:
    while a is not None and not isinstance(a, mmap.mmap):
        a = getattr(a, "base", None)
    return a


_CHUNK_BYTES = 16 << 20


def _read_tensor(sources, transform, start, shape, dtype) -> jax.Array:
    """One parameter from safetensors files (sources: [(SafeTensors, tensor name)], usually
    one): the HF tensor (memory-mapped) through its layout map (a transpose or the identity: a
    view) and, for a fused tensor, its slice, copied in 16 MiB blocks of the file into a fresh
    64-byte-aligned buffer that becomes the jax.Array without a copy (dlpack); after each block
    the file's pages leave this process (MADV_DONTNEED), so the host holds about one tensor,
    not the tensor twice."""
    src = transform(*(st[name] for st, name in sources))
    if start is not None:
        src = src[..., start:start + shape[-1]]
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    dest = raw[off:off + nbytes].view(dtype).reshape(shape)
    mapping = _file_mapping(src)
    if dest.ndim == 0:
        dest[...] = src
    else:
        # blocks along the file's outermost axis (a transposed view's last one), so a block
        # reads contiguous bytes of the file, not a stripe of every page
        axis = int(np.argmax(np.abs(src.strides)))
        step = max(1, _CHUNK_BYTES * shape[axis] // max(1, nbytes))
        for r in range(0, shape[axis], step):
            block = (slice(None),) * axis + (slice(r, r + step),)
            dest[block] = src[block]
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)
    del src, mapping
    return jax.dlpack.from_dlpack(dest)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json")


def copy_tokenizer(hf_dir: str, config, run_dir: str, overrides=()) -> None:
    """The model's tokenizer files (when hf_dir has them and the run reads text) copied to
    run_dir/tokenizer, which becomes the run's data.tokenizer (unless the overrides set one)."""
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if ("tokenizer" not in config.get("data", {}) or not found
            or any(o.removeprefix("--config.").startswith("data.tokenizer=") for o in overrides)):
        return
    if not {"tokenizer.json", "tokenizer.model"} & set(found):
        return  # a tokenizer_config.json alone names a Python tokenizer class: nothing to read
    target = os.path.abspath(os.path.join(run_dir, "tokenizer"))
    os.makedirs(target, exist_ok=True)
    for name in found:
        shutil.copy2(os.path.join(hf_dir, name), os.path.join(target, name))
    config.data.tokenizer = target
    check_vocab(load_tokenizer(target), config.model.vocab_size)


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
    for path, module in nnx.iter_modules(model):  # LoRA fine-tunes export their merged weights
        if isinstance(module, LoRALinear):
            name = "/".join(map(str, path))
            params[f"{name}/kernel"] = np.asarray(module.merged_kernel())
            del params[f"{name}/lora_a"], params[f"{name}/lora_b"]
    fused = {}  # HF tensor -> (to_hf, the parameters it holds in order: HFImporter)
    for name, (hf_name, _, to_hf) in importer.tensors(config).items():
        fused.setdefault(hf_name, (to_hf, []))[1].append(name)
    out = {}
    for hf_name, (to_hf, names) in fused.items():
        whole = np.concatenate([params.pop(n) for n in names], axis=-1) if len(names) > 1 \
            else params.pop(names[0])
        value = to_hf(whole)  # (several HF tensors: a tuple, HFImporter)
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
    # the run's tokenizer beside it (the files it was read from: tokenizer.json and its
    # tokenizer_config.json, or a SentencePiece model), as AutoTokenizer expects them
    spec = config.get("data", {}).get("tokenizer", "bytes")
    for path in load_tokenizer(spec).files:
        name = os.path.basename(path)
        name = "tokenizer.model" if name.endswith(".model") else name
        shutil.copy2(path, os.path.join(hf_dir, name))
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
            tok = any(os.path.exists(os.path.join(args.hf_dir, n))
                      for n in ("tokenizer.json", "tokenizer.model"))
            print(f"exported {args.run_dir} into {args.hf_dir} (config.json, model.safetensors"
                  f"{', the tokenizer' if tok else ''})")
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
