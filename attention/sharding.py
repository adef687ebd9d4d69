"""Logical-axis sharding names: the one rules table and the activation hint.

Model code names *logical* axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) on parameters
(`nnx.with_partitioning`) and on activations (`constrain`); one rules table, `LOGICAL_RULES`,
maps them to the mesh axes `data`, `fsdp`, `tensor` (the MaxText / flax lm1b convention), so
data parallel, FSDP and tensor parallel are config changes, never model edits.

The bottom floor of the sharding story: layers (attention/, models/) import it; the mesh, the
parameter shardings and the config checks built on it live in trainer/sharding.py. Imports
nothing from the project.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also shards parameters

# logical axis name -> mesh axes (None: replicated)
LOGICAL_RULES: dict[str, Any] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "norm": None,
    "param_tokens": "tensor",  # TokenFormer's parameter-token axis (attention/pattention.py)
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_vocab": "tensor",
}


def logical_to_spec(logical: Sequence[str | None] | None, rules=None) -> P:
    """('embed', 'mlp') -> P('fsdp', 'tensor') through the rules table."""
    rules = LOGICAL_RULES if rules is None else rules
    if logical is None:
        return P()
    out = []
    for name in logical:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        out.append(None if name is None else rules[name])
    return P(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside a mesh (eager, notebooks)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(logical)
    axes = [a for a in spec if a is not None]
    flat = [a for ax in axes for a in ((ax,) if isinstance(ax, str) else ax)]
    if any(a not in mesh.axis_names for a in flat):
        return x
    return jax.lax.with_sharding_constraint(x, spec)
