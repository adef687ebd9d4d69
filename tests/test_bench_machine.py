"""The machine stamp every CPU benchmark prints (trainer/perf.py), bench/peer.py's check of the
peers' folder, and bench/step_profile.py's accounting of a real XLA:CPU trace."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import load_bench

from trainer import perf


XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx fma avx2 bmi2\n"


def test_cpu_isa_names_the_vector_extensions():
    assert perf.cpu_isa(XEON) == ["AVX2", "FMA", "AVX-512F", "AVX-512BW", "AVX-512-VNNI",
                                  "AVX-512-BF16", "AMX-TILE", "AMX-BF16", "AMX-INT8"]
    assert perf.cpu_isa(EPYC) == ["AVX2", "FMA"]
    assert perf.cpu_isa("model name\t: x\n") == []


def test_machine_line_names_cpu_isa_cores_and_both_peaks():
    m = perf.machine(peak=123.45e9)
    assert m["cores"] == perf.cores() >= 1 and m["jax_matmul_gflops"] == 123.5
    assert m["isa"] == perf.cpu_isa()
    line = perf.machine_line(m)
    assert m["cpu"] in line and f"{m['cores']} cores" in line and "jax 123.5 GFLOP/s" in line
    assert "torch" not in line.split("(jax")[0]
    line = perf.machine_line(dict(m, isa=["AVX2", "FMA"], torch_matmul_gflops=99.0))
    assert "AVX2/FMA" in line and "torch 99.0 GFLOP/s" in line


def test_torch_peak_is_none_where_torch_cannot_run(tmp_path):
    assert perf.torch_matmul_peak(str(tmp_path / "no-python")) is None
    fake = tmp_path / "python"  # a "python" whose output is not the peak's JSON
    fake.write_text("#!/bin/sh\necho not json\n")
    fake.chmod(0o755)
    assert perf.torch_matmul_peak(str(fake)) is None
    fake.write_text("#!/bin/sh\necho '" + json.dumps({"gflops": 12.5, "torch": "x"}) + "'\n")
    assert perf.torch_matmul_peak(str(fake)) == {"gflops": 12.5, "torch": "x"}


def test_peer_bench_names_a_missing_peers_folder(tmp_path):
    peer = load_bench("peer")
    with pytest.raises(SystemExit, match="does not exist.*--peers <folder with bench.py, "
                                         "jax_gpt.py, torch_gpt.py>"):
        peer.check_peers(str(tmp_path / "nowhere"))
    (tmp_path / "bench.py").write_text("")
    with pytest.raises(SystemExit, match="lacks jax_gpt.py, torch_gpt.py"):
        peer.check_peers(str(tmp_path))
    for f in ("jax_gpt.py", "torch_gpt.py"):
        (tmp_path / f).write_text("")
    assert peer.check_peers(str(tmp_path)) == str(tmp_path)
    a = peer.parse_args(["--peers", str(tmp_path), "--configs", "a"])
    assert a.peers == str(tmp_path)


def test_step_profile_accounts_a_real_trace(tmp_path):
    """A jitted matmul followed by an elementwise tail, traced: the dot and the fusion are
    found with their HLO, the wall shares add up to the span, the dot's FLOPs are read off its
    operands' shapes."""
    sp = load_bench("step_profile")
    x = jnp.ones((256, 512), jnp.float32)
    w = jnp.ones((512, 384), jnp.float32) * 0.01
    f = jax.jit(lambda x, w: jnp.tanh(x @ w) * 2.0 + 1.0)
    compiled = f.lower(x, w).compile()
    texts = sp.instruction_texts(compiled.as_text())
    bodies = sp.fusion_bodies(compiled.as_text())
    dots = [n for n, t in texts.items() if " dot(" in t]
    assert len(dots) == 1 and sp.dot_flops(texts[dots[0]], texts) == 2.0 * 256 * 512 * 384
    assert sp.classify(dots[0], texts[dots[0]], bodies) == "matmul (dot)"
    jax.block_until_ready(compiled(x, w))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(compiled(x, w))
    path = next(os.path.join(r, n) for r, _, fs in os.walk(tmp_path) for n in fs
                if n.endswith(".xplane.pb"))
    shares, idle, span = sp.wall_shares(jax.profiler.ProfileData.from_file(path), texts, 2)
    assert dots[0] in shares and shares[dots[0]] > 0
    assert idle >= 0 and span > 0
    assert sum(shares.values()) + idle == pytest.approx(span, rel=1e-6)
    # the tanh tail ran as its own fusion after the dot
    assert any(sp.classify(n, texts[n], bodies).startswith("elementwise fusion") for n in shares)
