"""Every Pallas kernel compiled for a real TPU (Mosaic), and pod-scale dry runs, on this CPU.

Interpret mode checks a kernel's numbers but accepts block shapes and ops the Mosaic TPU lowering
rejects (STACK.md: cumsum inside a kernel, a 100-wide block). With libtpu (the `tpu-aot` extra,
installed by `make test`) `jax.experimental.topologies` describes TPU devices on a CPU-only
machine and `jit(...).lower(...).compile()` runs the real TPU compiler. Skipped only where libtpu
cannot be imported.
"""
from __future__ import annotations

import os
import pkgutil
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LM_CONFIG, REPO_ROOT, TINY

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu-aot]'; "
                                     "make test installs it): no TPU compiler on this machine")

import pallas_kernels  # noqa: E402
from attention.ops.block_sparse import BlockMask, block_sparse_attention  # noqa: E402
from attention.ops.gla import gla  # noqa: E402
from pallas_kernels import platform  # noqa: E402
from trainer.cli import load_config  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from trainer.sharding import topology_devices  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402

TOPOLOGY = "v5p:2x2x1"


def _kernel_names(package: str) -> set[str]:
    """The `name=` of every pallas_call in a kernel package's sources."""
    folder = os.path.join(os.path.dirname(pallas_kernels.__file__), package)
    names = set()
    for file in os.listdir(folder):
        if file.endswith(".py"):
            with open(os.path.join(folder, file)) as f:
                names |= set(re.findall(r'\bname="([a-z0-9_]+)"', f.read()))
    return names


def _kernel_packages() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(pallas_kernels.__path__) if m.ispkg}


def _compile_for_tpu(f, *args, topology: str = TOPOLOGY) -> str:
    """Compiles f(*args) (ShapeDtypeStructs) for one chip of `topology` (default v5p); returns
    the compiled HLO text."""
    mesh = jax.sharding.Mesh(np.array(topology_devices(topology)[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), platform.target_backend("tpu"):
        return jax.jit(f).lower(*args).compile().as_text()


# Shapes the layers use: (K, V) head dims of the GLA layer in configs/lm.py gla_tiny (d 64, 4
# heads), gla (d 512, 4 heads) and gla_1b / gla_8b (fla's 256 / 512); chunk 64 (the layer's
# default) and 128; T not a multiple of the chunk.
GLA_CASES = [(8, 16, 64, 100), (64, 128, 64, 300), (256, 512, 64, 200), (64, 128, 128, 256)]
# Block-sparse: (head dim, block_q, block_k, causal): the 64-token blocks of HiP / DHSA / SSA's
# defaults, the 128 ones of FlexPrefill and the pod configs, Landmark's 50 (tiles padded to 56),
# head dim 64 (the default LM) and 128 (the pod configs), GQA 2:1, T and S not multiples of the
# blocks.
SPARSE_CASES = [(64, 128, 128, True), (128, 128, 128, True), (64, 128, 64, False),
                (64, 64, 64, True), (128, 64, 128, False), (64, 50, 50, True)]

# the pallas_calls each compile test below must find in its TPU program
KERNELS = {
    "gla": ("gla_chunk_states", "gla_chunk_output", "gla_chunk_state_grads",
            "gla_chunk_input_grads"),
    "block_sparse": ("block_sparse_fwd", "block_sparse_bwd_dq", "block_sparse_bwd_dkv"),
}
# the GPU arrangements' own kernels (Triton): lowered for CUDA on this CPU, fwd + bwd, by
# tests/test_gla_pallas.py::test_gpu_kernels_lower_to_triton and
# tests/test_block_sparse_pallas.py::test_gpu_kernels_lower_to_triton, which find these names in
# the exported program (the GPU also runs the GLA output and input-gradient kernels above)
GPU_KERNELS = {
    "gla": ("gla_chunk_states_loop", "gla_chunk_state_grads_loop"),
    "block_sparse": ("block_sparse_fwd_gpu", "block_sparse_bwd_dq_gpu",
                     "block_sparse_bwd_dkv_gpu"),
}


def _assert_compiled(package: str, text: str) -> None:
    for name in KERNELS[package]:
        assert name in text, f"{name} was not compiled (impl='auto' on TPU must take the kernel)"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kd,vd,chunk,t", GLA_CASES)
def test_gla_kernels_compile_for_tpu(kd, vd, chunk, t, dtype):
    """Forward (chunk states, output) and backward (state grads, input grads, with a carried
    initial state and a final-state cotangent) through the op the GLA layer calls."""
    _assert_compiled("gla", _compile_gla(kd, vd, chunk, t, dtype))


def _compile_gla(kd, vd, chunk, t, dtype, topology=TOPOLOGY) -> str:
    B, H = 1, 2

    def f(q, k, v, log_g, h0, do, ds):
        def run(q, k, v, log_g, h0):
            return gla(q, k, v, log_g, initial_state=h0, output_final_state=True,
                       chunk_size=chunk, impl="auto")
        out, vjp = jax.vjp(run, q, k, v, log_g, h0)
        return out, vjp((do, ds))

    qk = jax.ShapeDtypeStruct((B, t, H, kd), dtype)
    args = (qk, qk, jax.ShapeDtypeStruct((B, t, H, vd), dtype),
            jax.ShapeDtypeStruct((B, t, H, kd), jnp.float32),
            jax.ShapeDtypeStruct((B, H, kd, vd), jnp.float32),
            jax.ShapeDtypeStruct((B, t, H, vd), dtype),
            jax.ShapeDtypeStruct((B, H, kd, vd), jnp.float32))
    return _compile_for_tpu(f, *args, topology=topology)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d,bq,block_k,causal", SPARSE_CASES)
def test_block_sparse_kernels_compile_for_tpu(d, bq, block_k, causal, dtype):
    """Forward and both backward kernels (with an lse cotangent) through the op."""
    _assert_compiled("block_sparse", _compile_block_sparse(d, bq, block_k, causal, dtype))


def _compile_block_sparse(d, bq, block_k, causal, dtype, topology=TOPOLOGY) -> str:
    B, T, S, H, Hkv = 1, 300, 250 if not causal else 300, 4, 2
    nq, nk = -(-T // bq), -(-S // block_k)
    dense = np.random.default_rng(0).random((1, H, nq, nk)) < 0.5
    dense[..., 0] = True  # no empty row
    mask = BlockMask.from_dense(jnp.asarray(dense), bq, block_k, q_len=T, k_len=S)

    def f(q, k, v, mask, do, dlse):
        out, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, causal=causal, impl="auto", return_lse=True), q, k, v)
        return out, vjp((do, dlse))

    args = (jax.ShapeDtypeStruct((B, T, H, d), dtype), jax.ShapeDtypeStruct((B, S, Hkv, d), dtype),
            jax.ShapeDtypeStruct((B, S, Hkv, d), dtype),
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mask),
            jax.ShapeDtypeStruct((B, T, H, d), dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    return _compile_for_tpu(f, *args, topology=topology)


# the other generations libtpu compiles for (v5p is TOPOLOGY above): one shape per kernel each,
# the layers' defaults (GLA chunk 64 with the default LM's head dims; block-sparse 64-token
# query blocks, Landmark's 50)
GENERATIONS = ["v5e:2x2", "v6e:2x2", "v4:2x2x1"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("topology", GENERATIONS)
def test_kernels_compile_for_every_tpu_generation(topology, dtype):
    assert topology_devices(topology)[0].device_kind.lower().startswith(
        "tpu " + topology.split(":")[0][:2])
    _assert_compiled("gla", _compile_gla(64, 128, 64, 300, dtype, topology))
    _assert_compiled("block_sparse", _compile_block_sparse(64, 64, 128, True, dtype, topology))
    _assert_compiled("block_sparse", _compile_block_sparse(64, 50, 50, False, dtype, topology))


# every mechanism that runs a Pallas kernel: (attention, the mode its sparse / linear attention
# runs in at its default config, the kernel package, whether to compile the backward too).
# Landmark's retrieval is inference only (its training runs the grouped softmax, no kernel), and
# libtpu 0.0.50's compiler aborts on the gradient of its whole prefill (cache writes included)
# with blocks of 50 on the XLA path as well ("TransformWindow: split of a padded window dim is
# not supported", fusion_util.cc): its forward here, the kernels' backward at blocks of 50 in
# SPARSE_CASES.
KERNEL_MECHANISMS = [("gla", "train", "gla", True), ("hedgehog", "train", "gla", True),
                     ("ssa", "train", "block_sparse", True),
                     ("routing", "train", "block_sparse", True),
                     ("landmark", "prefill", "block_sparse", False),
                     ("hip", "prefill", "block_sparse", True),
                     ("flexprefill", "prefill", "block_sparse", True),
                     ("dhsa", "prefill", "block_sparse", True)]


@pytest.mark.parametrize("attention,mode,package,backward", KERNEL_MECHANISMS)
def test_every_mechanism_reaches_its_kernel_at_its_defaults(attention, mode, package, backward,
                                                            monkeypatch):
    """The LM with each kernel mechanism at its default config (HiP's, DHSA's and SSA's 64-token
    blocks, Landmark's 50, Routing's T / C clusters), T = 1024, forward and backward (the
    gradient of the parameters through the mode's attention) compiled for TPU: every kernel of
    its package is in the program, and no op of it fell back to XLA."""
    from flax import nnx

    from models.lm import LM

    config = load_config(TINY, [f"model.attention={attention}"])
    B, T = 1, 1024
    model = nnx.eval_shape(lambda: LM(config.model, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, tokens):
        m = nnx.merge(graphdef, params, rest)
        if mode == "train":
            logits, _ = m(tokens)
        else:
            logits, _ = m(tokens, cache=m.init_cache(B, T), mode="prefill")
        return jnp.mean(jnp.square(logits.astype(jnp.float32)))

    fallbacks = []
    monkeypatch.setattr(platform, "note_fallback", lambda *a: fallbacks.append(a))
    text = _compile_for_tpu(jax.grad(loss) if backward else loss, params, rest,
                            jax.ShapeDtypeStruct((B, T), jnp.int32))
    if backward:
        _assert_compiled(package, text)
    else:
        assert KERNELS[package][0] in text, f"{attention}'s {mode} did not take the TPU kernel"
    assert not fallbacks  # no op of the mechanism took the XLA path


def test_every_kernel_mechanism_is_compile_checked():
    """A mechanism module that calls a kernel op is in KERNEL_MECHANISMS."""
    from attention import registry

    checked = {name for name, *_ in KERNEL_MECHANISMS}
    calls = re.compile(r"\b(block_sparse_attention|gla)\(")
    for name in registry.names():
        modules = {sys.modules[k.__module__] for k in registry.get(name).__mro__
                   if k.__module__.startswith("attention.")}
        sources = "".join(open(m.__file__).read() for m in modules)
        assert (name in checked) == bool(calls.search(sources)), (
            f"{name}: runs a kernel op iff it is in KERNEL_MECHANISMS")


def test_mosaic_rejects_what_interpret_mode_accepts():
    """The check has teeth: a 100-wide block runs in interpret mode but the TPU compiler refuses
    it (Mosaic's divisibility rule)."""
    from jax.experimental import pallas as pl

    def copy(interpret):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2
        return lambda x: pl.pallas_call(
            kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 100), lambda i: (0, i))],
            out_specs=pl.BlockSpec((8, 100), lambda i: (0, i)),
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)

    x = jnp.ones((8, 200), jnp.float32)
    np.testing.assert_array_equal(copy(True)(x), 2 * x)
    with pytest.raises(Exception, match="divisible by 8 and 128"):
        _compile_for_tpu(copy(False), jax.ShapeDtypeStruct(x.shape, x.dtype))


def test_every_kernel_package_has_a_tpu_compile_check():
    """A new kernel folder, or a new pallas_call in one, must be added to KERNELS (and so to a
    compile test above) or, a GPU-only kernel, to GPU_KERNELS (and a CUDA lowering test): the
    kernel names in the sources are exactly the ones checked."""
    assert _kernel_packages() == set(KERNELS), (
        f"kernel packages {sorted(_kernel_packages())}: add a TPU compile test for each new one")
    for package, names in KERNELS.items():
        checked = set(names) | set(GPU_KERNELS.get(package, ()))
        assert _kernel_names(package) == checked, (
            f"pallas_kernels/{package}: kernels {sorted(_kernel_names(package))}, compile-checked "
            f"{sorted(checked)}")


# ----------------------------------------------------------------------------- pod dry runs
def _dry_run(config_name, *overrides):
    config = load_config(config_name, list(overrides))
    with Trainer(config, "/nonexistent/never_created", dry_run=True,
                 devices=topology_devices(TOPOLOGY)) as t:
        report = t.dry_run()
    return t, report


@pytest.mark.parametrize("variant,mesh", [("tiny", ("mesh.data=4",)),
                                          ("gla_tiny", ("mesh.data=2", "mesh.tensor=2"))])
def test_dry_run_on_a_tpu_topology(variant, mesh):
    """The tiny LMs' real train step (sharded params, optimizer state and batch; GLA's kernels
    per device under shard_map) compiles for a v5p:2x2x1 slice and fits the chip's HBM."""
    t, report = _dry_run(f"{LM_CONFIG}:{variant}", *mesh)
    plan = t.plan
    assert plan["chips"] == 4 and plan["device_kind"].startswith("TPU v5")
    assert plan["fits"] and 0 < plan["bytes_per_chip"] <= plan["chip_bytes"] == 95 * 2**30
    assert plan["step_flops"] > 0 and plan["step_seconds"] > 0
    assert 0 < plan["mfu"] < plan["hfu"] < 1 and plan["units_per_second"] > 0
    for text in ("of 95.00 GiB", "fits", "GFLOP per step", "tokens/s", "MFU"):
        assert text in report


def test_dry_run_counts_the_kernels_flops():
    """XLA cannot look inside a Mosaic call: the kernels' cost estimates must reach the step's
    FLOPs (compiled: HFU) and the model's (MFU). On a GLA LM where attention is most of the work
    (one 256 x 256 head, chunks of 256: tests/test_flops.py checks each kernel's own figure), the
    kernel's counts stay near the XLA path's, which XLA counts itself."""
    shape = ("mesh.data=4", "model.num_heads=1", "model.num_kv_heads=1", "model.gla_expand_k=4",
             "model.gla_expand_v=4", "model.gla_chunk=256", "data.seq_len=512",
             "model.max_len=512")
    with_kernel, report = _dry_run(f"{LM_CONFIG}:gla_tiny", *shape)
    without, _ = _dry_run(f"{LM_CONFIG}:gla_tiny", *shape, "model.gla_impl=xla")
    cfg = load_config(f"{LM_CONFIG}:gla_tiny", list(shape))
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    attention = 3 * cfg.model.num_layers * tokens * (4 * 256 * 256 + 256 * (256 + 256))
    assert attention > 0.5 * with_kernel.model_flops  # attention dominates
    for key in ("step_flops", "model_flops"):
        ratio = with_kernel.plan[key] / without.plan[key]
        assert 0.75 < ratio < 1.33, (key, ratio)
    assert 0 < with_kernel.plan["mfu"] <= with_kernel.plan["hfu"] < 1
    assert "MFU" in report and "HFU" in report


def test_dry_run_mesh_that_does_not_divide_the_topology():
    config = load_config(TINY, ["mesh.data=1", "mesh.tensor=3"])
    with pytest.raises(ConfigError, match=r"config\.mesh: .*tensor=3.*4 are available"):
        Trainer(config, "/nonexistent", dry_run=True, devices=topology_devices(TOPOLOGY))


def test_dry_run_command_line_with_topology(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    env.pop("XLA_FLAGS", None)
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "trainer.main", f"--config={TINY}", "--dry_run",
         f"--workdir={tmp_path / 'w'}", *a], env=env, capture_output=True, text=True, timeout=300,
        cwd=REPO_ROOT)
    p = run("--topology=v5p:2x2x1", "--config.mesh.data=2", "--config.mesh.fsdp=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 tpu devices" in p.stdout and "fits" in p.stdout and "MFU" in p.stdout
    # a parameter the mesh cannot split: listed, nothing compiled, exit status 1
    p = run("--topology=v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.tensor=4",
            "--config.model.d_model=36", "--config.model.head_dim=16")
    assert p.returncode == 1 and "not compiled" in p.stdout
    p = run("--topology=v5p:banana")
    assert p.returncode == 2 and "not a TPU topology" in p.stderr
    assert not (tmp_path / "w").exists(), "a dry run writes nothing"
