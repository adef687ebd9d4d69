"""Mesh and parameter shardings.

The logical axis names and their one rules table live in attention/sharding.py (the layers'
floor); this module builds the mesh from config.mesh and turns a model's logical names into
NamedShardings on it (re-exporting the rules, `logical_to_spec` and `constrain`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from attention.sharding import (  # noqa: F401  (re-exported)
    BATCH_AXES, LOGICAL_RULES, MESH_AXES, constrain, logical_to_spec)
from trainer.config import ConfigError


def mesh_shape(config, num_devices: int | None = None) -> dict[str, int]:
    """Resolves mesh.data/fsdp/tensor (one may be -1 = the rest) against the device count."""
    n = num_devices if num_devices is not None else jax.device_count()
    sizes = {a: int(config.mesh[a]) for a in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    rest = [a for a, s in sizes.items() if s == -1]
    if rest:
        if n % known:
            raise ConfigError(
                f"config.mesh: the fixed axes ({', '.join(f'{a}={s}' for a, s in sizes.items() if s != -1)}) "
                f"multiply to {known}, which does not divide the {n} devices")
        sizes[rest[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ConfigError(
            f"config.mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
            f"= {math.prod(sizes.values())} devices, but {n} are available; make the product {n} "
            f"or set one axis to -1")
    return sizes


def topology_devices(name: str) -> list:
    """The devices of a TPU slice described by libtpu, e.g. "v5p:4x4x4" (64 chips) or
    "v5e:16x16", usable on a machine without TPUs for ahead-of-time compilation (the `tpu-aot`
    extra installs libtpu). Raises ConfigError naming the problem."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology={name}: describing TPU devices needs libtpu, which is not "
                          "installed; pip install -e '.[tpu-aot]' (make test installs it)")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's own message says what is wrong with the name
        raise ConfigError(f"--topology={name!r} is not a TPU topology libtpu knows "
                          f"(e.g. v5p:2x2x1, v5p:4x4x4, v5e:16x16, v6e:2x2, v4:2x2x2): "
                          f"{str(e).splitlines()[0]}") from None


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _logical_names(variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or None


def state_shardings(abstract_state, mesh: Mesh, on_problem: str = "raise"):
    """NamedShardings for an (abstract) nnx.State from its variables' logical axis names.

    Raises ConfigError listing every parameter whose sharded dimension the mesh does not divide
    (on_problem="replicate": such dimensions are left unsharded instead; the dry run uses it),
    each once under its model path ('blocks/3/attn/q_proj/kernel'): of a (model, optimizer)
    state, the optimizer's copies of a listed parameter (Adam's mu / nu) are not listed again.
    """
    from flax import nnx

    problems: dict[str, str] = {}  # path -> problem, in tree order (model before optimizer)

    def one(path, variable):
        logical = _logical_names(variable)
        spec = list(logical_to_spec(logical))
        shape = variable.get_value().shape
        for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
            k = _axis_size(mesh, axes)
            if size % k:
                name = "/".join(str(getattr(p, "key", p)) for p in path)
                problems.setdefault(f"{name} dim {dim}", f"(size {size}, logical "
                                    f"{logical[dim]!r}) is not divisible by mesh axes {axes} "
                                    f"of size {k}")
                spec[dim] = None
        return variable.replace(NamedSharding(mesh, P(*spec)))

    shardings = jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if problems and all(k[:2] in ("0/", "1/") for k in problems):  # a (model, optimizer) state
        model = {k[2:]: v for k, v in problems.items() if k.startswith("0/")}
        problems = dict(model, **{k: v for k, v in problems.items() if k.startswith("1/")
                                  and not any(k.endswith("/" + m) for m in model)})
    problems = [f"{name} {why}" for name, why in problems.items()]
    if problems and on_problem == "raise":
        raise ConfigError("config.mesh: these parameters cannot be sharded on this mesh:\n  "
                          + "\n  ".join(problems))
    return shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
