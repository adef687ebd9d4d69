"""Configs: the fields every family shares, typed command-line values, generic validation.

(Loading a config file, its mechanism's options and overrides: trainer/cli.py.) A config file is a Python module with `get_config(variant: str | None) -> ConfigDict`
(big_vision style); `configs/lm.py:tiny` names the file and the variant. Configs are locked
after construction so a misspelt override fails, naming the valid keys.

Every family's config starts from `base_config()`, which holds the fields the trainer and the
tools rely on (train.steps, train.global_batch_size, train.lr, eval.every, checkpoint.every,
mesh.data/fsdp/tensor, data.paths, model.attention, init_from).
"""
from __future__ import annotations

import ast
import json
import os
import re
from typing import Any, Sequence

from ml_collections import ConfigDict

from attention import fields


class ConfigError(ValueError):
    """A bad config value; the message names the field and what is allowed."""


CARRY = ("params", "params+optimizer", "params+optimizer+step")  # config.init_from_carry


def base_config() -> ConfigDict:
    """Fields shared by every family, with defaults that run on a laptop CPU."""
    c = ConfigDict()
    c.task = ""  # the Task registered by a family module (models/<family>.py)
    c.seed = 0
    c.init_from = ""  # a checkpoint directory to initialise a new run from
    # regex: parameters of this model that may be absent from init_from (kept at their initial
    # values, e.g. "feature_map" when converting softmax attention to Hedgehog)
    c.init_from_new = ""
    # regex: parameters NOT loaded from init_from even where the source has them (fresh init:
    # e.g. "^classifier" when fine-tuning on another label set; big_vision's dont_load)
    c.init_from_skip = ""
    # what init_from transfers (trainer.Trainer._init_from): "params" (fresh optimizer, step 0);
    # "params+optimizer" (Adam moments carried, step and schedule restart at 0);
    # "params+optimizer+step" (moments, step, schedule and data position continue)
    c.init_from_carry = "params"
    # fields taken from the init_from run's saved config (comma-separated fields or groups,
    # e.g. "model.d_model,data.tokenizer"; trainer.cli.inherit_config): a fine-tuning recipe
    # builds the source's architecture whatever its size; --config.<field> overrides still win
    c.init_from_config = ""
    # a schedule of runs in one command (trainer/stages.py): dicts of field overrides, e.g.
    # ({"train.steps": 100}, {"model.param_tokens": 128, "train.steps": 200}); stage i trains in
    # <workdir>/stage_<i> and initialises from stage i-1 (config.init_from_carry)
    c.stages = ()

    c.train = ConfigDict()
    c.train.steps = 100
    c.train.global_batch_size = 8
    c.train.grad_accum_steps = 1  # micro-batches per optimizer step
    c.train.lr = 1e-3
    c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
    c.train.warmup_steps = 10
    # the horizon of the warmup + cosine schedule; 0: train.steps. Staged runs that continue
    # the step (init_from_carry ...+step) share one schedule by setting it to the total.
    c.train.schedule_steps = 0
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.weight_decay = 0.1  # applied to parameters with ndim >= 2 only
    c.train.grad_clip_norm = 1.0  # 0 disables clipping
    c.train.compute_dtype = "float32"  # "bfloat16": bf16 compute, f32 parameters
    c.train.remat = False  # rematerialise each block in the backward pass
    c.train.nan_policy = "skip"  # non-finite loss/grads: "skip" the update (counted) or "stop"
    c.train.log_every = 10
    # regex over parameter paths ("blocks/0/attn/feature_map_q/w"): only matching parameters
    # are trained (the rest frozen, no optimizer state); "" trains all
    c.train.trainable = ""

    c.eval = ConfigDict()
    c.eval.every = 100  # 0: only at the end
    c.eval.batches = 8

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 100  # 0: only at the end
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    # a checkpoint read that fails is retried this many times (backoff retry_seconds * 2**i):
    # storage hiccups clear; a step whose files fail verification is skipped for an older one
    c.checkpoint.restore_retries = 3
    c.checkpoint.retry_seconds = 1.0
    # when no checkpoint of the workdir is readable: False stops with an error (nothing moved);
    # True moves them to checkpoints.unreadable/ and starts at step 0. A readable one is always
    # resumed, so a rerun command may keep the flag.
    c.checkpoint.from_scratch = False
    # fields a resume may change although they define the model, the data stream or the
    # schedule (trainer.config.resume_changes): comma-separated names or groups, e.g.
    # "data.paths,train.lr" or "data"
    c.checkpoint.allow_changes = ""
    # multi-process runs: a SIGTERM / SIGINT on any process stops all of them at one step within
    # about this many seconds (trainer/signals.py; preemption notices give ~30 s)
    c.checkpoint.stop_within_seconds = 10.0

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: the rest of the devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.data = ConfigDict()
    c.data.paths = ()  # empty: the family's embedded default
    c.data.num_workers = 0  # Grain worker processes
    # files that cannot be read: False stops the run, naming them (all those a header pass
    # before the first step finds, or the one a later decode fails on, after a checkpoint);
    # True leaves them out / replaces the example by the next readable one, each named once in
    # a warning (trainer.data.check_files, SkipBad)
    c.data.skip_bad = False

    c.model = ConfigDict()
    c.model.attention = "softmax"  # attention registry name
    return c


def variant_fields(variants: dict, name: str | None, default: str, file: str) -> dict:
    """The fields of config variant `name` (None: `default`) of a config file's VARIANTS, over
    those of its `base` variant when it names one; an unknown name is a ConfigError listing them."""
    name = name or default
    if name not in variants:
        raise ConfigError(f"{file}: unknown variant {name!r}; known variants: "
                          f"{', '.join(variants)}")
    v = dict(variants[name])
    if "base" in v:
        v = {**variants[v.pop("base")], **v}
    return v


def schedule_from(c: ConfigDict, v: dict, *, evals: int = 4) -> ConfigDict:
    """Sets a config variant's schedule (v: steps, batch, lr, warmup) with `evals` evaluations
    and checkpoints over the run; returns c. The family config files share it."""
    c.train.steps = v["steps"]
    c.train.global_batch_size = v["batch"]
    c.train.lr = v["lr"]
    c.train.warmup_steps = v["warmup"]
    c.eval.every = max(v["steps"] // evals, 1)
    c.checkpoint.every = max(v["steps"] // evals, 1)
    return c


# ----------------------------------------------------------------------------- fields
def _leaf_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        if isinstance(v, ConfigDict):
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def _parse(text: str, current: Any, key: str) -> Any:
    """Parses a command-line string into the type of the field it replaces."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{key}: expected a bool (true/false), got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config.{key}: expected an int, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config.{key}: expected a float, got {text!r}") from None
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [p for p in text.split(",") if p]  # a,b,c: a list of strings
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config.{key}: expected a list, got {text!r}")
        return type(current)(value)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def set_field(config: ConfigDict, key: str, value: Any) -> None:
    """Sets `a.b.c` in a locked config; unknown keys and wrong types raise ConfigError."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:i]) or "the config"
            valid = _leaf_keys(config)
            raise ConfigError(
                f"unknown config field {key!r}: {where} has no field {part!r}. "
                f"Valid fields: {', '.join(valid)}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ConfigDict):
        raise ConfigError(f"config.{key} is a group; set one of its fields: "
                          f"{', '.join(_leaf_keys(current, key + '.'))}")
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse(value, current, key)
    try:
        node[parts[-1]] = value
    except TypeError as e:
        raise ConfigError(f"config.{key}: {e}") from None


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))


# ----------------------------------------------------------------------------- validation
# The bounds of the shared fields (attention/fields.py rules); a family's own fields are in its
# Task's FIELD_RULES, a mechanism's options in its OPTION_RULES.
BASE_RULES = {
    "seed": ">= 0",
    "init_from_carry": CARRY,
    "train.steps": ">= 0",  # 0: evaluate only (with init_from, or a workdir to resume)
    "train.global_batch_size": ">= 1",
    "train.grad_accum_steps": ">= 1",
    "train.lr": "> 0",
    "train.min_lr_ratio": "[0, 1]",
    "train.warmup_steps": ">= 0",
    "train.schedule_steps": ">= 0",
    "train.b1": "[0, 1)",
    "train.b2": "[0, 1)",
    "train.eps": "> 0",
    "train.weight_decay": ">= 0",
    "train.grad_clip_norm": ">= 0",
    "train.compute_dtype": ("float32", "bfloat16"),
    "train.nan_policy": ("skip", "stop"),
    "train.log_every": ">= 1",
    "eval.every": ">= 0",
    "eval.batches": ">= 1",
    "checkpoint.every": ">= 0",
    "checkpoint.max_to_keep": ">= 1",
    "checkpoint.restore_retries": ">= 0",
    "checkpoint.retry_seconds": ">= 0",
    "checkpoint.stop_within_seconds": "> 0",
    "mesh.data": ">= 1 or == -1",  # -1: the rest of the devices
    "mesh.fsdp": ">= 1 or == -1",
    "mesh.tensor": ">= 1 or == -1",
    "data.num_workers": ">= 0",
}


def check_rules(config: ConfigDict, rules: dict) -> None:
    """ConfigError for the first field of `rules` whose value `config` holds out of bounds."""
    try:
        fields.check_all(config, rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def validate(config: ConfigDict) -> None:
    """Checks the family-independent fields (the Task checks its own); raises ConfigError."""
    t = config.train
    require(bool(config.task), "task", "no task set; the family config must set config.task")
    require(not config.stages, "stages",
            "is a schedule of runs, not one run: train it with python -m trainer.main or "
            "trainer.stages.fit_stages(config, workdir); trainer.stages.runs(config, workdir) gives "
            "one checked (config, workdir) per stage for a Trainer each")
    check_rules(config, BASE_RULES)
    require(t.global_batch_size % t.grad_accum_steps == 0, "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")
    require([config.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) <= 1, "mesh",
            "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for p in config.data.paths:
        require(isinstance(p, str) and p, "data.paths", f"entries must be non-empty paths, got {p!r}")
        require(os.path.exists(p), "data.paths", f"{p!r} does not exist")
    leaves = _leaf_keys(config)
    for name in filter(None, (n.strip() for n in config.checkpoint.allow_changes.split(","))):
        require(any(_matches(k, [name]) for k in leaves), "checkpoint.allow_changes", f"{name!r} is not a field or group of this config "
            "(comma-separated names such as data.paths,train.lr or a group such as data)")
    require(not config.init_from or os.path.isdir(config.init_from), "init_from",
            f"{config.init_from!r} is not a directory")
    require(not config.get("init_from_config") or config.init_from, "init_from_config",
            f"{config.get('init_from_config')!r} takes fields from the run config.init_from "
            "names: set --config.init_from=RUN_DIR")
    for field, value in (("train.trainable", config.train.trainable),
                         ("init_from_new", config.init_from_new),
                         ("init_from_skip", config.init_from_skip)):
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"config.{field}: {value!r} is not a regular expression ({e})") from None


# ----------------------------------------------------------------------------- resuming
# Fields a resumed run may change: where and how it runs, not what it computes. Everything else
# (task, seed, model.*, data.*, the optimizer and schedule, a family's own groups such as a loss)
# defines the model, the data stream or the schedule, and a change is refused unless allowed.
RESUME_FREE = ("mesh.", "checkpoint.", "eval.", "stages", "init_from", "init_from_new",
               "init_from_config",
               "init_from_skip", "init_from_carry", "data.num_workers", "data.skip_bad",
               "train.log_every",
               "train.remat", "train.nan_policy", "train.grad_accum_steps", "train.steps")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _matches(field: str, patterns: Sequence[str]) -> bool:
    """field is one of `patterns` or inside a group named by one ("data" or "data.")."""
    return any(p and (field == p or field.startswith(p.rstrip(".") + ".")) for p in patterns)


def resume_changes(saved: dict, config: ConfigDict, free: Sequence[str] = (), *,
                   training: bool = True) -> list[str]:
    """'field: old -> new' of every field that differs between a checkpoint's saved config and
    the config resuming it, where the difference changes the model, the data stream or the
    schedule: all fields but RESUME_FREE, the Task's `free` groups and those listed in
    config.checkpoint.allow_changes. train.steps may change when the schedule's horizon stays
    (train.schedule_steps set); a field new since the checkpoint was saved is not a change.
    training=False (the run only evaluates the checkpoint, e.g. train.steps=0): the data stream
    and the schedule do not matter, only the model's fields are compared."""
    old, new = _flat(saved), _flat(json.loads(to_json(config)))
    allowed = [p.strip() for p in config.checkpoint.allow_changes.split(",")]
    if not training:
        allowed += ["train", "data"]
    out = []
    for field in sorted(new):
        if field not in old or _same(old[field], new[field]):
            continue
        if _matches(field, allowed) or _matches(field, [*RESUME_FREE, *free]):
            continue
        out.append(f"{field}: {old[field]!r} -> {new[field]!r}")
    horizon = lambda f: f.get("train.schedule_steps") or f.get("train.steps")  # noqa: E731
    if (horizon(old) != horizon(new)
            and _same(old.get("train.schedule_steps"), new.get("train.schedule_steps"))
            and not _matches("train.steps", allowed)):
        out.append(f"train.steps: {old.get('train.steps')!r} -> {new.get('train.steps')!r} "
                   f"moves the schedule's horizon (set train.schedule_steps="
                   f"{horizon(old)} to keep the old schedule)")
    return out
