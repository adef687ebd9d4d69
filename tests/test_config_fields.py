"""Every field of every family's every config variant, tried with a bad value (issue 25, item 3).

The fields come from the config tree itself (each variant's leaves, and each registered
mechanism's options), not from a hand list: a numeric field gets 0, -1 and a wrong type, a string
field an unknown value, a bool a non-bool. Each must stop the run before anything compiles with a
ConfigError naming the field, or be accepted on purpose: listed in ACCEPTED with the reason, and
then a dry-run Trainer (the model built abstractly, the optimizer, the shardings) must build from
it without an error. The checks run as the CLI's, with or without --dry_run: trainer.cli.check
(load_config's parse, trainer.stages.runs), then the Task's Trainer-side checks (check_fields,
validate on one device) in the order trainer.Trainer runs them.
"""
from __future__ import annotations

import importlib
import os

import pytest
from ml_collections import ConfigDict

from attention import fields, registry
from trainer.cli import load_config
from trainer.config import ConfigError
from trainer.stages import runs
from trainer.task import get_task

FAMILIES = ("lm", "tokenformer", "vit", "iformer", "detr", "mixformer", "ast")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# (field, value) -> why a run accepts it. A family-specific entry is keyed "family:field".
ACCEPTED = {
    ("seed", "0"): "a seed",
    ("data.seed", "0"): "a seed",
    ("data.synthetic_seed", "0"): "a seed",
    ("train.steps", "0"): "evaluates only (init_from, or a workdir to resume)",
    ("train.warmup_steps", "0"): "no warmup",
    ("train.schedule_steps", "0"): "the schedule's horizon is train.steps",
    ("train.min_lr_ratio", "0"): "cosine decay to 0",
    ("train.b1", "0"): "Adam without momentum (RMSProp-like)",
    ("train.b2", "0"): "Adam's second moment of the last step only (sign-like update)",
    ("train.weight_decay", "0"): "no weight decay",
    ("train.grad_clip_norm", "0"): "no clipping",
    ("train.label_smoothing", "0"): "no smoothing",
    ("train.trainable", "nosuch_value"): None,  # the Trainer refuses it (matches no parameter)
    ("eval.every", "0"): "evaluates only at the end",
    ("checkpoint.every", "0"): "saves only at the end",
    ("checkpoint.restore_retries", "0"): "a failed read is not retried",
    ("checkpoint.retry_seconds", "0"): "retries without waiting",
    ("mesh.data", "-1"): "the rest of the devices",
    ("mesh.fsdp", "-1"): "the rest of the devices",
    ("data.num_workers", "0"): "examples are read in the training process",
    ("data.embedded_dir", "nosuch_value"): "where the embedded data is written (created)",
    ("detr:data.train_split", "nosuch_value"):
        "a COCO split name, checked against data.paths when set (the embedded data has its own)",
    ("detr:data.eval_split", "nosuch_value"):
        "a COCO split name, checked against data.paths when set (the embedded data has its own)",
    ("data.noise", "0"): "clean synthetic images",
    ("data.negative_ratio", "0"): "positives only (stage 1 trains the box)",
    ("data.num_distractors", "0"): "sequences without distractors",
    ("lm:model.lora_rank", "0"): "no LoRA (every weight as the config trains it)",
    ("data.scale_jitter", "0"): "no jitter",
    ("data.center_jitter", "0"): "no jitter",
    ("data.template_jitter", "0"): "no jitter",
    ("data.freqm", "0"): "no frequency masking",
    ("data.timem", "0"): "no time masking",
    ("data.mixup", "0"): "no mixup",
    ("data.norm_mean", "0"): "a spectrogram mean",
    ("data.norm_mean", "-1"): "a spectrogram mean",
    ("model.head_dim", "0"): "d_model // num_heads",
    ("model.rope_theta", "0"): "no RoPE",
    ("model.max_len", "0"): "learned positions only (RoPE models have none)",
    ("model.norm_eps", "0"): "the norm's default epsilon",
    ("model.hedgehog_feature_dim", "0"): "the head dim",
    ("model.hip_mask_k", "0"): "no tree search: the sinks, the window and the diagonal (a control)",
    ("model.moh_shared_heads", "0"): "every head routed",
    ("model.moh_aux_weight", "0"): "no load-balance loss",
    ("model.num_queries_one2many", "0"): "no hybrid-matching query group",
    ("model.classifier_std", "0"): "a zero-initialised head",
    ("model.pattention_zoom", "0"): "the default zoom for the token count",
    ("model.ffn_pattention_zoom", "0"): "the default zoom for the token count",
    ("loss.w_class", "0"): "switches the classification term off",
    ("loss.w_l1", "0"): "switches the L1 box term off",
    ("loss.w_giou", "0"): "switches the GIoU term off",
    ("loss.eos_coef", "0"): "no weight on the no-object class",
    ("loss.one_to_many_k", "0"): "no one-to-many matching",
    ("loss.box_weight", "0"): "stage 2 trains the score head only",
    ("loss.score_weight", "0"): "stage 1 trains the box only",
    ("loss.score_min_iou", "0"): "MixFormer's labels (target in the crop or not)",
    ("track.margin", "0"): "boxes may touch the frame's edge",
    ("track.score_threshold", "0"): "every candidate template qualifies",
    ("sample.max_new_tokens", "0"): "no sample at the end of training",
    ("sample.temperature", "0"): "greedy sampling",
    ("sample.top_k", "0"): "the whole vocabulary",
    ("sample.prompt", "nosuch_value"): "any prompt",
    ("init_from_new", "nosuch_value"): "a regular expression over parameter names",
    ("init_from_skip", "nosuch_value"): "a regular expression over parameter names",
    # mechanism options (their 0 means something)
    ("model.routing_cluster_size", "0"): "ceil(T / num_clusters)",
    ("model.routing_local_heads", "0"): "no local heads",
    ("model.routing_local_heads", "-1"): "half the heads",
    ("model.routing_ema_decay", "0"): "centroids set to the batch's means",
    ("model.routing_commitment", "0"): "no commitment loss",
    ("model.landmark_top_k", "0"): "only the local block",
    ("model.hip_window", "0"): "no sliding window",
    ("model.hip_sink", "0"): "no sink tokens",
    ("model.dhsa_window", "0"): "no sliding window",
    ("model.dhsa_sink", "0"): "no sink tokens",
    ("model.flex_tau", "0"): "every head vertical-slash",
    ("model.flex_min_budget", "0"): "no minimum budget",
    ("model.ssa_locality", "0"): "uniform block sampling",
    ("model.act_alpha", "0"): "a calibration weight",
    ("model.act_beta", "0"): "a calibration threshold",
}


def _bad_values(value) -> list[str]:
    if isinstance(value, bool):
        return ["maybe"]
    if isinstance(value, (int, float)):
        return ["0", "-1", "x"]
    if isinstance(value, str):
        return ["nosuch_value"]
    return []  # tuples: their elements are checked by the same rules (see the unit test below)


def _leaves(config: ConfigDict, prefix: str = ""):
    for k, v in config.items():
        if isinstance(v, ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _preflight(spec: str, overrides: list[str], workdir: str):
    """What a command checks before it builds anything (trainer.main, trainer.Trainer)."""
    for c, _ in runs(load_config(spec, overrides), workdir):
        get_task(c.task)(c).check(ONE_DEVICE)


def _reason(family: str, field: str, value: str):
    for key in (f"{family}:{field}", field):
        if (key, value) in ACCEPTED:
            return True, ACCEPTED[(key, value)]
    return False, None


# data written where the value points: tried in the first variant only (minutes otherwise)
WRITES_DATA = ("data.embedded_dir",)
# the embedded datasets the checks write (into the test's own cache), small; a field under test
# takes its bad value over these
SMALL = {"data.num_train": 8, "data.num_eval": 8, "data.num_sequences": 4, "data.num_frames": 8,
         "data.synthetic_per_fold": 1, "data.samples_per_epoch": 8, "data.eval_samples": 8}


def _small(config) -> list[str]:
    have = dict(_leaves(config))
    return [f"{k}={v}" for k, v in SMALL.items() if k in have]


def _walk(family: str, spec: str, tmp_path, monkeypatch, done: set):
    """{(field, value): error or None} for every bad value of every field of `spec`."""
    base = load_config(spec)
    fix = _small(base) + ([f"init_from={tmp_path}"] if base.init_from or base.init_from_config
                          else [])
    # a fine-tuning variant's shapes come from its init_from run: walked with its own instead
    fix += ["init_from_config="] if base.init_from_config else []
    staged = {k for stage in base.stages for k in stage}  # each stage sets these itself
    out = {}
    for field, value in _leaves(base):
        if field in staged or field == "stages" or (field in WRITES_DATA and field in done):
            continue
        done.add(field)
        for bad in _bad_values(value):
            cwd = tmp_path / "cwd" / f"{field}={bad}"  # a relative path value lands here, alone
            cwd.mkdir(parents=True, exist_ok=True)
            monkeypatch.chdir(cwd)
            try:
                _preflight(spec, [*fix, f"{field}={bad}"], str(tmp_path / "w"))
                out[(field, bad)] = None
            except ConfigError as e:
                out[(field, bad)] = str(e)
    return out


def _check(family, variant, results, accepted_seen):
    problems = []
    for (field, bad), error in results.items():
        listed, reason = _reason(family, field, bad)
        if error is None:
            if not listed:
                problems.append(f"{field}={bad!r} was accepted but is not listed in ACCEPTED")
            else:
                accepted_seen.setdefault((field, bad), (reason, variant))
        elif field not in error:
            problems.append(f"{field}={bad!r}: the error does not name the field: {error}")
    return problems


@pytest.mark.parametrize("family", FAMILIES)
def test_every_field_of_every_variant_is_checked_or_accepted_on_purpose(family, tmp_path,
                                                                        monkeypatch):
    from trainer.trainer import Trainer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # embedded data: here
    module = importlib.import_module(f"configs.{family}")
    problems, accepted, done = [], {}, set()
    for variant in module.VARIANTS:
        spec = f"{CONFIGS}/{family}.py:{variant}"
        results = _walk(family, spec, tmp_path, monkeypatch, done)
        problems += [f"{variant}: {p}" for p in _check(family, variant, results, accepted)]
    assert not problems, "\n".join(problems)
    # what is accepted builds: in the first variant accepting it, a dry-run Trainer (abstract
    # model, optimizer, shardings; not for data fields, whose embedded data would be rewritten)
    monkeypatch.chdir(tmp_path)
    for (field, bad), (reason, variant) in sorted(accepted.items()):
        if field.startswith("data.") or field in ("init_from_new", "init_from_skip"):
            continue
        spec = f"{CONFIGS}/{family}.py:{variant}"
        config = load_config(spec, [*_small(load_config(spec)), f"{field}={bad}"])
        if config.init_from:
            config.init_from = str(tmp_path / "cwd")
        try:
            for c, d in runs(config, str(tmp_path / "w")):
                Trainer(c, d, dry_run=True, checked=True, quiet=True)
        except ConfigError as e:
            if reason is not None or field not in str(e):
                problems.append(f"{field}={bad!r} ({reason}): {e}")
        except Exception as e:  # noqa: BLE001 -- the point: any other error is a defect
            problems.append(f"{field}={bad!r} ({reason}): {type(e).__name__}: {e}")
        else:
            if reason is None:
                problems.append(f"{field}={bad!r} built, but ACCEPTED says the Trainer refuses it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("mechanism", registry.names())
def test_every_mechanism_option_is_checked_or_accepted_on_purpose(mechanism, tmp_path):
    """Each registered mechanism's options in the tiny LM (the variants above cover only the
    mechanisms some config names)."""
    from conftest import TINY

    defaults = registry.option_defaults(registry.get(mechanism))
    problems = []
    for key, value in defaults.items():
        for bad in _bad_values(value):
            try:
                _preflight(TINY, [f"model.attention={mechanism}", f"model.{key}={bad}"],
                           str(tmp_path))
            except ConfigError as e:
                if f"model.{key}" not in str(e):
                    problems.append(f"model.{key}={bad!r}: the error does not name it: {e}")
                continue
            if not _reason("lm", f"model.{key}", bad)[0]:
                problems.append(f"model.{key}={bad!r} was accepted but is not listed")
    assert not problems, "\n".join(problems)


def test_the_rule_language():
    fields.check("a", 3, ">= 1")
    fields.check("a", (1, 2), ">= 1")  # every element
    fields.check("a", -1, ">= 1 or == -1")
    fields.check("a", 0.5, "(0, 1]")
    fields.check("a", "x", ("x", "y"))
    for value, rule, message in ((0, ">= 1", r"config.a=0: must be >= 1"),
                                 ((1, 0), ">= 1", r"config.a=\(1, 0\): must be >= 1 \(each"),
                                 (0, "(0, 1]", r"must be \(0, 1\]"),
                                 (1, "[0, 1)", r"must be \[0, 1\)"),
                                 ("z", ("x", "y"), r"config.a='z': allowed: 'x', 'y'"),
                                 (True, ">= 0", "must be"), ("3", ">= 0", "must be")):
        with pytest.raises(ValueError, match=message):
            fields.check("a", value, rule)
    with pytest.raises(ValueError, match="bad field rule"):
        fields.check("a", 1, "~ 1")


def test_declared_rules_name_declared_fields():
    """A rule for a field no variant has, or an option the class does not declare, is a typo."""
    from trainer.config import BASE_RULES, _leaf_keys, base_config

    base = set(_leaf_keys(base_config()))
    assert set(BASE_RULES) <= base, set(BASE_RULES) - base
    for name in registry.names():
        cls = registry.get(name)
        unknown = set(registry.option_rules(cls)) - set(registry.option_defaults(cls))
        assert not unknown, (name, unknown)
    have, tasks = set(), set()  # a base Task's rules serve families with fewer fields
    for family in FAMILIES:
        module = importlib.import_module(f"configs.{family}")
        for variant in module.VARIANTS:
            have |= set(_leaf_keys(module.get_config(variant)))
        tasks.add(get_task(module.get_config(None).task))
    for task in tasks:
        unknown = set(task.field_rules()) - have
        assert not unknown, (task.__name__, unknown)
