"""FLOPs of a step and the peak they are measured against: model FLOPs (MFU) and the compiled
program's FLOPs (HFU)."""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import jax.extend.core as jex_core

# dense bf16 peak per chip, FLOP/s (vendor datasheets)
_DATASHEET = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}

# memory per chip, bytes (vendor datasheets), for devices that cannot report their own (the
# TPU descriptions libtpu gives a CPU-only machine for ahead-of-time compilation)
_GIB = 1024**3
_HBM = {
    "h100": 80 * _GIB, "h200": 141 * _GIB, "a100": 80 * _GIB, "l4": 24 * _GIB, "a10": 24 * _GIB,
    "tpu v4": 32 * _GIB, "tpu v5 lite": 16 * _GIB, "tpu v5e": 16 * _GIB, "tpu v5p": 95 * _GIB,
    "tpu v5": 95 * _GIB, "tpu v6 lite": 32 * _GIB, "tpu v6e": 32 * _GIB,
}


# memory bandwidth per chip, bytes/s (datasheets), for the roofline step-time estimate
_HBM_BANDWIDTH = {
    "h100": 3.35e12, "h200": 4.8e12, "a100": 2.0e12, "l4": 0.3e12, "a10": 0.6e12,
    "tpu v4": 1.2e12, "tpu v5 lite": 0.819e12, "tpu v5e": 0.819e12, "tpu v5p": 2.765e12,
    "tpu v5": 2.765e12, "tpu v6 lite": 1.64e12, "tpu v6e": 1.64e12,
}


def _lookup(table: dict, device) -> float:
    kind = device.device_kind.lower()
    return next((v for name, v in table.items() if name in kind), float("nan"))


def device_memory(device) -> tuple[float, str]:
    """(bytes of memory of one device, where the figure comes from): the runtime's own limit
    where the device reports one, else the datasheet HBM of its kind (nan if unknown)."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # an abstract (topology) device has no runtime behind it
        limit = None
    if limit:
        return float(limit), "runtime limit"
    size = _lookup(_HBM, device)
    if size == size:  # not nan
        return float(size), f"datasheet HBM ({device.device_kind})"
    return size, f"unknown device kind {device.device_kind!r}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


# the CPU features that decide which kernels XLA:CPU and PyTorch run (matmul peaks, vector width)
_ISA_FLAGS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512F"), ("avx512bw", "AVX-512BW"),
              ("avx512_vnni", "AVX-512-VNNI"), ("avx512_bf16", "AVX-512-BF16"),
              ("amx_tile", "AMX-TILE"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


def cpu_isa(cpuinfo: str | None = None) -> list[str]:
    """The vector ISA extensions this CPU reports (the flags of /proc/cpuinfo, or of the text
    given), e.g. ["AVX2", "FMA"]; [] where unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return [name for flag, name in _ISA_FLAGS if flag in flags]


def cores() -> int:
    """The cores this process may run on (its affinity), as the benchmarks pin them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine(peak: float | None = None) -> dict:
    """What a CPU figure depends on: model, ISA, cores, jax's f32 2048^2 matmul FLOP/s now."""
    return {"cpu": _cpu_name(), "isa": cpu_isa(), "cores": cores(),
            "jax_matmul_gflops": round((peak or measure_cpu_matmul()) / 1e9, 1),
            "jax": jax.__version__}


_TORCH_PEAK = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1])); n = 2048
a = torch.randn(n, n); a @ a
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t0)
print(json.dumps({"gflops": 2 * n ** 3 / best / 1e9, "torch": torch.__version__}))
"""


def torch_matmul_peak(python: str, threads: int | None = None) -> dict | None:
    """PyTorch's f32 2048^2 matmul GFLOP/s on this host now (best of 5), measured by the python
    of a torch venv in a subprocess: {"gflops", "torch"}, or None where it cannot run."""
    import subprocess

    try:
        out = subprocess.run([python, "-c", _TORCH_PEAK, str(threads or cores())],
                             capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def machine_line(info: dict | None = None) -> str:
    """One line naming the machine a benchmark ran on (every published figure carries one)."""
    m = info or machine()
    return (f"machine: {m['cpu']}, {'/'.join(m['isa']) or 'no AVX'}, {m['cores']} cores, "
            f"f32 2048^2 matmul: jax {m['jax_matmul_gflops']} GFLOP/s"
            + (f", torch {m['torch_matmul_gflops']} GFLOP/s" if m.get("torch_matmul_gflops")
               else "") + f" (jax {m['jax']})")


@functools.cache
def cpu_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """The best jitted f32 n x n matmul FLOP/s seen on this host, all cores.

    A busy machine measures low, which would inflate MFU; so the best figure measured so far on
    this CPU model and core count is kept in ~/.cache/polyformer/cpu_peak.json and used when higher
    (but not when over twice the new measurement: then it is not a figure of this machine).
    """
    measured = measure_cpu_matmul(n, reps)
    key = f"{_cpu_name()} x{cores()} n{n}"
    path = os.path.join(os.path.expanduser("~"), ".cache", "polyformer", "cpu_peak.json")
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    cached = float(cache.get(key, 0.0))
    if cached > 2 * measured:  # not this machine's figure (or a bad one): trust the new one
        cached = 0.0
    best = max(measured, cached)
    if best > cached:
        cache[key] = best
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass
    return best


def measure_cpu_matmul(n: int = 2048, reps: int = 5) -> float:
    """Jitted f32 n x n matmul FLOP/s on this host now (best of `reps`)."""
    cpu = jax.local_devices(backend="cpu")[0]  # an addressable one, also with many processes
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), cpu)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(devices=None) -> tuple[float, str]:
    """Peak FLOP/s of the whole mesh and where the figure comes from.

    CPU: the measured matmul peak of the host (simulated devices share its cores), times the
    number of processes. GPU/TPU: the datasheet bf16 peak of the chip times the chip count.
    """
    devices = devices or jax.devices()
    if devices[0].platform == "cpu":
        return cpu_matmul_peak() * jax.process_count(), "measured f32 matmul peak"
    flops = _lookup(_DATASHEET, devices[0])
    if flops == flops:  # not nan
        return flops * len(devices), f"datasheet bf16 peak ({devices[0].device_kind})"
    return flops, f"unknown device kind {devices[0].device_kind!r}"


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return cost or {}


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products a jaxpr computes once (what PaLM's and MaxText's MFU count:
    2 m n k per product, elementwise work left out), for every mechanism alike: dot_general and
    convolutions as traced, a Pallas kernel as its declared cost estimate (its body is not XLA's
    to count), scans times their length, a cond's costliest branch, a shard_map's per-shard
    count times its distinct shards (the axes its specs split over). A while loop's trip count
    is unknown: its body is counted once.
    `jaxpr`: a Jaxpr or ClosedJaxpr (jax.make_jaxpr)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            # out [N, C_out, spatial...] in the op's dimension numbers: each output element is
            # a dot over C_in / groups x the kernel's spatial window
            rhs = eqn.invars[1].aval.shape
            spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            window = math.prod(rhs[d] for d in spec[2:]) * rhs[spec[1]]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * window
        elif name == "pallas_call":
            cost = params.get("cost_estimate")
            total += float(cost.flops) if cost is not None else 0.0
        elif name == "cond":
            total += max(matmul_flops(b) for b in params["branches"])
        else:
            inner = sum(matmul_flops(v) for v in params.values()
                        if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)))
            if name == "scan":
                inner *= params["length"]
            elif name == "shard_map":
                # distinct shards: the manual axes the specs split over (an axis that leaves
                # every operand whole repeats the same work on each of its devices)
                split = {a for spec in (*params["in_specs"], *params["out_specs"])
                         for entry in (spec or ()) if entry is not None
                         for a in ((entry,) if isinstance(entry, str) else entry)}
                inner *= math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"]
                                   if a in split)
            total += inner
    return total


def compiled_flops(compiled, num_devices: int) -> float:
    """Total FLOPs of one call from XLA's cost analysis (which reports one SPMD partition)."""
    return float(_cost(compiled).get("flops", float("nan"))) * num_devices


def estimated_seconds(compiled, device) -> tuple[float, str]:
    """(seconds of one call on `device`'s chip, how it was estimated), a lower bound either way:
    the TPU compiler's own figure ("optimal_seconds": compute and memory traffic, without
    communication overlap or host stalls) where it gives a sane one, else the roofline of XLA's
    FLOP and byte counts against the chip's datasheet peak and bandwidth (libtpu's figure
    overflows to negative values for the largest programs). (nan, ...) on CPU or an unknown chip."""
    cost = _cost(compiled)
    xla = float(cost.get("optimal_seconds", float("nan")))
    if xla > 0:
        return xla, "XLA's TPU cost model"
    if device.platform == "cpu":
        return float("nan"), "no estimate on CPU"
    peak, bandwidth = _lookup(_DATASHEET, device), _lookup(_HBM_BANDWIDTH, device)
    flops, traffic = float(cost.get("flops", "nan")), float(cost.get("bytes accessed", "nan"))
    how = ("roofline of XLA's FLOP and byte counts" if "optimal_seconds" not in cost else
           f"libtpu's estimate was {xla:.3g} s (overflow), so the roofline of XLA's FLOP and "
           "byte counts")
    return max(flops / peak, traffic / bandwidth), how
