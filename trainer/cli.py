"""The one config pipeline, shared by `python -m trainer.main`, the family tools and Python:

    load_config(spec, overrides)   the config file's variant -> the attention mechanism's
                                   options (attention.registry.add_options) -> --config.<field>
                                   overrides (one parser: parse_overrides / apply_overrides)
    check(config)                  validate once, before anything is built: the generic fields
                                   (trainer.config.validate), then the mechanism's options
                                   (attention.registry.check_options)

then trainer.stages.runs(config, workdir) expands config.stages into one checked (config,
workdir) per run (a Trainer never sees `stages`). The task's own checks against the mesh
(Task.validate) need the devices, so the Trainer runs them when it builds the mesh. This module
stays light (no jax): command-line tools parse and check before anything heavy starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Any, Sequence

from ml_collections import ConfigDict

from attention import registry
from trainer.config import ConfigError, set_field, validate


# ----------------------------------------------------------------------------- overrides
def parse_with_overrides(parser: argparse.ArgumentParser, argv):
    """(args, ["a.b=v", ...]): the parser's flags and the --config.<field>=<value> overrides;
    anything else is a usage error naming it (every command-line tool shares this)."""
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for a in rest:
        if not a.startswith("--config."):
            parser.error(f"unrecognised argument {a!r}; config fields are set with "
                         "--config.<field>=<value>")
        overrides.append(a[len("--config."):])
    return args, overrides


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def tool_parser(prog: str, description: str, *, example: str = "configs/lm.py:tiny",
                from_help: str = "the trained run's workdir (its newest checkpoint and saved "
                                 "config)", batches: int | None = None,
                batches_help: str = "calibration batches (train data, train.global_batch_size "
                                    "each)") -> argparse.ArgumentParser:
    """The parser every tool working on a trained run starts from: --config (whose fields the
    --config.<field> flags set), --from (the run, reopened through trainer.api) and, given a
    default, --batches (>= 1)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help=f"config file and variant, e.g. {example}")
    p.add_argument("--from", dest="source", required=True, help=from_help)
    if batches is not None:
        p.add_argument("--batches", type=_at_least_one, default=batches, help=batches_help)
    return p


def apply_overrides(config: ConfigDict, overrides: Sequence[str] | dict[str, Any]) -> ConfigDict:
    """Sets `a.b=value` strings (or a {field: value} dict) on a locked config, parsing each string
    to its field's type; a new model.attention brings in that mechanism's options. Unknown
    fields and bad values raise ConfigError naming them. Returns config."""
    items = overrides.items() if isinstance(overrides, dict) else [
        _split(item) for item in overrides]
    for key, value in items:
        key = key.removeprefix("--config.").removeprefix("config.")
        set_field(config, key, value)
        if key == "model.attention":  # the new mechanism's own options become fields too
            registry.add_options(config.model)
    return config


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not of the form field.path=value")
    return key, value


# ----------------------------------------------------------------------------- loading
def _load_module(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such config file {path!r}")
    name = "polyformer_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(variant)")
    return module


def finish_config(config: ConfigDict) -> ConfigDict:
    """What a config file's get_config returns: the config with its attention mechanism's
    options added (registry defaults; values already set are kept), locked, so that a misspelt
    field fails in a notebook (`config.train.stpes = 3`) as it does on the command line."""
    if "model" in config and "attention" in config.model:
        registry.add_options(config.model)
    config.lock()
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path/to/file.py[:variant]` (finish_config: its attention mechanism's options
    added, locked) and applies `a.b=value` overrides; then the fields config.init_from_config
    takes from the init_from run (inherit_config), and the overrides again (they win)."""
    path, _, variant = spec.partition(":")
    config = finish_config(_load_module(path).get_config(variant or None))
    apply_overrides(config, overrides)
    # (without an init_from, or one that is no directory, check() refuses: a clear message)
    if config.get("init_from_config") and config.init_from and os.path.isdir(config.init_from):
        apply_overrides(inherit_config(config), overrides)
    return config


def saved_config(workdir: str, field: str = "init_from") -> dict:
    """The resolved config saved with the newest complete checkpoint of a run directory (read
    as JSON, without starting Orbax); ConfigError naming `field` when there is none."""
    root = os.path.join(workdir, "checkpoints")
    steps = sorted((int(n) for n in (os.listdir(root) if os.path.isdir(root) else ())
                    if n.isdigit() and os.path.isfile(os.path.join(root, n, "config", "metadata"))),
                   reverse=True)
    if not steps:
        raise ConfigError(f"config.{field}: {workdir!r} holds no checkpoint with a saved config "
                          "(a run directory of trainer.main or trainer.convert import-hf)")
    with open(os.path.join(root, str(steps[0]), "config", "metadata")) as f:
        return json.load(f)


def inherit_config(config: ConfigDict) -> ConfigDict:
    """Sets the fields named by config.init_from_config (fields or groups, comma-separated; a
    "-prefix" entry leaves out the fields starting with it, e.g. "model,-model.lora_") to their
    values in the init_from run's saved config; fields the source lacks keep their values.
    ConfigError without an init_from, or for a source of another task."""
    entries = [f.strip() for f in config.init_from_config.split(",") if f.strip()]
    names = [f for f in entries if not f.startswith("-")]
    left_out = [f[1:] for f in entries if f.startswith("-")]
    field = f"init_from_config={config.init_from_config!r} with init_from"
    saved = saved_config(config.init_from, field)
    from trainer.task import get_task
    allowed = (config.task, *get_task(config.task).init_from_tasks)
    if saved.get("task") not in allowed:
        raise ConfigError(f"config.{field}: {config.init_from!r} is a {saved.get('task')!r} run; "
                          f"this config is {config.task!r}, which starts from "
                          f"{' or '.join(map(repr, allowed))} runs")

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    for key, value in leaves(saved):
        if (not any(key == n or key.startswith(n + ".") for n in names)
                or any(key.startswith(x) for x in left_out)):
            continue
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, ConfigDict) else None
        if not isinstance(node, ConfigDict) or parts[-1] not in node:
            continue
        current = node[parts[-1]]
        set_field(config, key, tuple(value) if isinstance(current, tuple) else value)
    if config.get("model") is not None and "attention" in config.model:
        registry.add_options(config.model)
    return config


# ----------------------------------------------------------------------------- checks
def check(config: ConfigDict) -> None:
    """The checks every run passes before anything is built: the generic fields, then the
    registered attention mechanism's options (ConfigError naming the field)."""
    validate(config)
    # a name the registry does not hold is the family's to judge (MixFormer's "mixed" is its own
    # block; an unknown name fails in the Task's checks, listing the registry)
    if "model" in config and config.model.get("attention") in registry.names():
        try:
            registry.check_options(config.model)
        except ValueError as e:
            msg = str(e)
            raise ConfigError(msg.removeprefix("config.") if msg.startswith("config.") else
                              f"model.attention={config.model.attention!r}: {msg}") from None
