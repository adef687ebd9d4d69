"""The loop's state: one typed pytree, donated to the jitted train step and checkpointed whole.

On disk (trainer/checkpoint.py) it is the dict of its fields, so checkpoints written before the
state was typed resume unchanged, and array names stay 'nnx/0/<model path>', 'nnx/1/<optimizer
path>', 'step', 'nonfinite', 'first_nonfinite' (trainer.checkpoint.by_name).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    nnx: Any  # nnx.State of (model, optimizer)
    step: Any  # int32 []: optimizer steps taken (skipped non-finite ones included)
    nonfinite: Any  # int32 []: steps whose update was skipped for a non-finite loss or gradient
    first_nonfinite: Any  # int32 []: the first such step, -1 while there is none

    @classmethod
    def fresh(cls, nnx_state) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(nnx=nnx_state, step=zero, nonfinite=zero, first_nonfinite=zero - 1)

    @classmethod
    def like(cls, nnx_value, scalar) -> "TrainState":
        """A tree of the state's shape with `nnx_value` for the model and optimizer and
        `scalar` for each counter (abstract arrays, shardings)."""
        return cls(nnx=nnx_value, step=scalar, nonfinite=scalar, first_nonfinite=scalar)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)
