"""Sets an XLA:CPU flag before jax starts its CPU backend (imported first by `attention` and
`trainer`).

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
