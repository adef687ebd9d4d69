"""bench/gpu.py, the GPU benchmark (issue 28), end to end on this CPU: the kernels in interpret
mode against their references, the timing tables and the training row, at tiny shapes; and its
check reports a wrong kernel as FAIL."""
import os
import subprocess
import sys

import jax.numpy as jnp
from conftest import REPO_ROOT, load_bench


def test_gpu_bench_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    p = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(out)], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    text = out.read_text()
    for section in ("## Kernel checks", "## GLA against dense", "## Block-sparse attention",
                    "## Training"):
        assert section in text
    checks = [line for line in text.splitlines() if line.startswith(("| gla |", "| block_sparse |"))]
    assert len(checks) == 4 and all("| ok |" in line for line in checks), checks
    assert "| 1 | 128 |" in text and "| 256 |" in text and "| tiny | 4 |" in text


def test_gpu_bench_check_fails_a_wrong_kernel():
    gpu = load_bench("gpu")
    row = gpu._compare("k", (3,), jnp.float32, lambda: (jnp.ones(3),), lambda: (jnp.ones(3) * 1.01,),
                       ("o",))
    assert row["status"] == "FAIL" and "worst o 9.9e-03" in row["detail"]
    row = gpu._compare("k", (3,), jnp.bfloat16, lambda: (jnp.ones(3),), lambda: (jnp.ones(3) * 1.01,),
                       ("o",))
    assert row["status"] == "ok"

    def no_lowering():
        raise NotImplementedError("only the TPU lowering; use xla")
    row = gpu._compare("k", (3,), jnp.float32, no_lowering, None, ("o",))
    assert row["status"] == "no kernel" and row["detail"] == "only the TPU lowering"
