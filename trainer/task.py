"""The Task protocol: everything family-specific the generic Trainer needs, and their registry.

A family registers one Task (models/<family>.py + configs/<family>.py); the Trainer never
branches on the family. `config.task` names it; `models.<task>` is imported on first use.
"""
from __future__ import annotations

import abc
import importlib
from typing import Any, Iterable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.config import ConfigError, check_rules

_TASKS: dict[str, type["Task"]] = {}


AUX_LOSS = "aux_loss"  # what layers sow auxiliary losses as: self.sow(nnx.Intermediate, AUX_LOSS, v)


def loss_with_aux(task: "Task", model: nnx.Module, batch) -> tuple[jax.Array, dict[str, Any]]:
    """task.loss(model, batch) plus the auxiliary losses the model's layers sowed while it ran
    (MoH's load balance, Routing's commitment, Hedgehog's distillation: DESIGN.md), for every
    family alike: their mean over the sowing layers is added to the loss and reported as the
    `aux_loss` metric. Traced inside the trainer's jitted steps."""
    (loss, metrics), inter = nnx.capture(lambda m: task.loss(m, batch), nnx.Intermediate)(model)
    aux = [v for path, v in jax.tree_util.tree_flatten_with_path(inter)[0]
           if any(getattr(k, "key", None) == AUX_LOSS for k in path)]
    if not aux:
        return loss, metrics
    aux_loss = sum(jnp.mean(a) for a in aux) / len(aux)  # mean over the layers
    return loss + aux_loss, dict(metrics, aux_loss=aux_loss)


def register_task(name: str):
    def deco(cls):
        cls.name = name
        _TASKS[name] = cls
        return cls
    return deco


def get_task(name: str) -> type["Task"]:
    if name not in _TASKS:
        try:
            importlib.import_module(f"models.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"models.{name}":
                raise
    if name not in _TASKS:
        raise ConfigError(f"config.task: unknown task {name!r}; registered: {', '.join(sorted(_TASKS)) or '(none)'}")
    return _TASKS[name]


def all_tasks() -> list[type["Task"]]:
    """Every family's Task class: each module of the families' package is imported (a family
    registers its Task on import), as get_task imports one by name."""
    import pkgutil
    families = importlib.import_module("models")
    for module in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{module.name}")
    return list(_TASKS.values())


class Task(abc.ABC):
    """Base class of a family's task. Batches are dicts of numpy arrays, leading axis = batch.

    Subclasses implement:
      build_model(rngs) -> nnx.Module
      train_data() -> grain.MapDataset of examples, shuffled and repeated (infinite)
      eval_data() -> grain.MapDataset of examples (finite, deterministic); an example whose
        file cannot be read raises trainer.data.BadExample (the Trainer replaces it under
        data.skip_bad, else stops after a checkpoint, naming the file)
      loss(model, batch) -> (scalar loss, {name: scalar metric})  # traced inside jit; the
        trainer adds the layers' sown auxiliary losses itself (loss_with_aux)
    and declare FIELD_RULES (the bounds of their config fields); and may override validate (what
    involves several fields or the mesh), eval_summary, units_per_example, on_fit_end; the dataset-level
    evaluation hooks eval_outputs, eval_metrics and eval_images (COCO AP, tracking metrics,
    pictures for TensorBoard); and the two hooks of initialising from another run's checkpoint
    (config.init_from): check_init_from and adapt_init_from (how a family grows its arrays, e.g.
    TokenFormer's parameter tokens).
    """

    name: str = ""
    throughput_unit: str = "examples"  # reported as <unit>/s
    # the family's own config groups a resumed run may change (e.g. "sample." for what is
    # generated at the end); every other family group is checked (trainer.config.resume_changes)
    resume_free: tuple[str, ...] = ()
    # Hugging Face architectures this family holds ({"LlamaForCausalLM": trainer.hf.HFImporter});
    # `python -m trainer.convert import-hf` reads each class's own (a subclass does not inherit)
    hf_importers: dict = {}
    # False while trainer.convert writes a checkpoint of a model trained elsewhere: its label set
    # is the checkpoint's, not the config's data's, and validate skips the checks comparing the
    # model with the data (e.g. a classifier's outputs and the data's classes); a run that
    # trains or evaluates the model makes them
    match_data: bool = True
    # what adapt_init_from does to a source's arrays of another shape, for the log: "growth"
    # (the model grows and should compute the source's function: the loss on a fixed eval batch
    # is compared before / after, trainer.transfer) or a description of an adaptation whose
    # inputs differ, so no loss is compared (AST: "position embeddings resized")
    init_from_adaptation: str = "growth"
    # the bounds of the family's own fields, in the rule language of attention/fields.py
    # ({"model.num_layers": ">= 1", "model.norm": ("layernorm", "rmsnorm")}); a subclass adds
    # to its bases' (field_rules()); checked before validate, fields a variant lacks skipped
    FIELD_RULES: dict = {}

    def __init__(self, config):
        self.config = config

    # ---- checks before anything compiles
    @classmethod
    def field_rules(cls) -> dict:
        out = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("FIELD_RULES", {}))
        return out

    def check_fields(self) -> None:
        """ConfigError for a family field out of its FIELD_RULES bounds (any mesh)."""
        check_rules(self.config, self.field_rules())

    def check(self, mesh_sizes: dict[str, int]) -> None:
        """Every check of the family's fields for this mesh: check_fields, then validate."""
        self.check_fields()
        self.validate(mesh_sizes)

    def validate(self, mesh_sizes: dict[str, int]) -> None:
        """Raise trainer.config.ConfigError for family fields that are bad for this mesh
        (the bounds in FIELD_RULES are checked before, by check_fields)."""

    # ---- model
    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The family's NNX model, built from self.config."""

    # ---- data
    @abc.abstractmethod
    def train_data(self) -> grain.MapDataset:
        """Training examples: a shuffled, repeated (infinite) grain.MapDataset of dicts."""

    @abc.abstractmethod
    def eval_data(self) -> grain.MapDataset:
        """Held-out examples: a finite, deterministic grain.MapDataset of dicts."""

    def units_per_example(self) -> int:
        """How many throughput units (tokens, images, ...) one example holds."""
        return 1

    # ---- loss and metrics
    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Any]]:
        """(scalar loss, {name: scalar metric}) of a batch; traced inside the jitted step."""

    def eval_outputs(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-example arrays (leading axis = batch) to collect over the eval split, traced in
        the eval step next to loss(): e.g. a detector's top-k boxes and the image ids. The
        trainer concatenates them on the host for eval_metrics and eval_images."""
        return {}

    def eval_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Dataset-level metrics (e.g. COCO AP) of the collected eval_outputs."""
        return {}

    def eval_images(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Images for TensorBoard, {name: uint8 [H, W, 3]}, drawn from the collected
        eval_outputs (e.g. predicted boxes on a few eval images)."""
        return {}

    def eval_summary(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived eval metrics from the batch-averaged ones (e.g. bits per byte)."""
        return metrics

    def on_fit_end(self, model: nnx.Module, log) -> None:
        """Called once after training (e.g. the LM prints a generated sample)."""

    # ---- initialising from another run (config.init_from)
    # other families whose runs this one may start from (init_from, init_from_config): their
    # parameters are this family's (e.g. video from an image ViT); check_init_from still judges
    init_from_tasks: tuple[str, ...] = ()

    def check_init_from(self, source_config: dict) -> None:
        """Raise trainer.config.ConfigError when a run with `source_config` (the JSON config
        saved with its checkpoint) cannot initialise this one, naming the fields and the fix."""

    def adapt_init_from(self, name: str, source: jax.Array, target: jax.Array):
        """This run's array `name` (a '/'-joined path: a parameter's, or an optimizer moment's,
        whose suffix is the parameter's) from the source's array of another shape; `target` is
        this run's freshly initialised array (its shape, dtype and initial values). None when
        the family has no mapping for it (the trainer then reports the mismatch). Raise
        ConfigError for a mapping the family refuses (e.g. shrinking)."""
        return None

    def describe(self) -> Iterable[str]:
        return ()
