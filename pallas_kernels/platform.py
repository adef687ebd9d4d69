"""Which chip a kernel is being built for, and running kernels per shard of a sharded model.

`backend()` is normally `jax.default_backend()`. Compiling ahead of time for another platform
(the trainer's `--dry_run --topology=v5p:4x4x4` lowers for TPU devices described by libtpu on a
CPU-only machine) happens under `target_backend("tpu")`, so the attention ops' impl="auto" picks
the kernels the real chip would run and the kernels compile through Mosaic instead of interpret
mode.

`per_shard` runs a kernel under `jax.shard_map` when a mesh is active: Mosaic kernels cannot be
partitioned automatically ("Mosaic kernels cannot be automatically partitioned. Please wrap the
call in a shard_map", STACK.md), so each device runs the kernel on its own batch and head slice.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("pallas_target", default=None)

# mesh axes a batch dimension / a head dimension is split over (attention/sharding.py's
# LOGICAL_RULES for the "batch" and "act_heads" activation axes)
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)


def backend() -> str:
    """The platform kernels are built for: the innermost `target_backend`, else jax's default."""
    target = _TARGET.get()
    return target if target is not None else jax.default_backend()


@contextlib.contextmanager
def target_backend(platform: str | None):
    """Trace (and lower) for `platform` ("tpu", "gpu", "cpu"; None: jax's default backend)."""
    token = _TARGET.set(None if platform is None else str(platform).lower())
    try:
        yield
    finally:
        _TARGET.reset(token)


_FALLBACKS_SAID: set[tuple[str, str, str]] = set()


def note_fallback(caller: str, kernel: str, reason: str) -> None:
    """Says once per (caller, kernel, reason), as a warning, that impl="auto" runs the XLA path
    on an accelerator rather than the Pallas kernel (CPU's XLA path is the plan, not a fallback)."""
    key = (caller, kernel, reason)
    if key not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(key)
        warnings.warn(f"{caller}: impl='auto' runs the XLA path on {backend()}, not the {kernel} "
                      f"Pallas kernel: {reason}", stacklevel=3)


def interpret_default() -> bool:
    """Kernels run in interpret mode only where there is no compiler for them: on CPU."""
    return backend() == "cpu"


def is_gpu() -> bool:
    return backend() in ("gpu", "cuda", "rocm")


def _mesh_axes(mesh, wanted: Sequence[str], sizes: Sequence[int]) -> tuple[str, ...] | None:
    """The axes of `wanted` present in the mesh if they divide every size (size-1 dimensions are
    broadcasts and stay whole), else None."""
    axes = tuple(a for a in wanted if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes:
        return None
    n = math.prod(mesh.shape[a] for a in axes)
    return axes if all(s % n == 0 for s in sizes if s != 1) else None


def per_shard(fn: Callable, args: Sequence, batch_dims: Sequence[int | None],
              head_dims: Sequence[int | None], out_batch_dims: Sequence[int | None],
              out_head_dims: Sequence[int | None]) -> tuple:
    """fn(*args) -> tuple of arrays, run per device: every array split over the active mesh's
    batch axes (data, fsdp) at its batch dim and over the tensor axis at its head dim, outputs
    likewise. A dimension is split only where the mesh divides it in every array; size-1 dims
    (a broadcast mask, MQA's one kv head) stay whole. So any shapes work: what does not divide
    is computed replicated. Without a mesh (eager, notebooks, one device) this is fn(*args)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return tuple(fn(*args))
    shapes = [a.shape for a in args]
    out_shapes = [s.shape for s in jax.eval_shape(lambda *a: tuple(fn(*a)), *args)]
    all_shapes = shapes + out_shapes

    def split(wanted, dims):
        return _mesh_axes(mesh, wanted, [s[d] for s, d in zip(all_shapes, dims) if d is not None])

    batch_axes = split(BATCH_MESH_AXES, list(batch_dims) + list(out_batch_dims))
    head_axes = split(HEAD_MESH_AXES, list(head_dims) + list(out_head_dims))

    def spec(shape, bdim, hdim):
        parts = [None] * len(shape)
        for dim, axes in ((bdim, batch_axes), (hdim, head_axes)):
            if dim is not None and axes is not None and shape[dim] != 1:
                parts[dim] = axes[0] if len(axes) == 1 else axes
        return P(*parts)

    in_specs = tuple(spec(s, b, h) for s, b, h in zip(shapes, batch_dims, head_dims))
    out_specs = tuple(spec(s, b, h) for s, b, h in zip(out_shapes, out_batch_dims, out_head_dims))
    return jax.shard_map(lambda *a: tuple(fn(*a)), mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)(*args)
