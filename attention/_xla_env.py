"""Environment set before jax starts a backend (imported first by `attention` and `trainer`):
an XLA:CPU flag, and quiet libtpu start-up on machines without TPUs (see the end).

jaxlib 0.12.0.1's XLA:CPU miscompiles some "ynn" library fusions: a batched dot against a zero
operand fused with a reduction returns garbage on most compiles (see
tests/test_gla.py::test_xla_cpu_ynn_fusion_workaround). Turning those fusions off fixes it and
is also faster for our LMs on CPU (default LM step 1.09 s vs 1.24 s). The flag only matters
before the backend initialises (importing jax alone does not initialise it) and has no effect
on GPU/TPU. A user's own setting of the flag is kept.
"""
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type="

if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()

# libtpu (the `tpu-aot` extra, for compiling TPU programs on this machine) makes every jax start
# on a machine without TPU chips print initialisation errors about the unknown accelerator type
# and worker hostnames, and lets only one process at a time use it. Where no TPU chip is
# attached, tell it there is none to look for and no chip to lock (the variables are only
# defaults: a real TPU VM, or a user's own setting, is left alone).
def _quiet_libtpu_without_tpus() -> None:
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return
    try:
        from jax._src import hardware_utils  # importing jax does not start a backend
        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # a jax without this helper: keep libtpu's own behaviour
        return
    if chips == 0:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # any valid name: no chip uses it
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # no chip to guard: let several processes compile at once (libtpu otherwise takes
        # /tmp/libtpu_lockfile and a second dry run fails with "Internal error ... lockfile")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_quiet_libtpu_without_tpus()
