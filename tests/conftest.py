"""Shared set-up: 8 simulated CPU devices, a compile-light XLA:CPU, one compilation cache per
test run, absolute config paths, tiny configs, run helpers.

XLA_FLAGS and the cache directory must be set before jax is first imported (they are read when
the backend starts), so they are set here at import time, before anything imports jax; the
subprocesses a test starts inherit them.
"""
from __future__ import annotations

import os
import shutil
import tempfile


def xla_flags(devices: int = 8) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices: the environment's
    flags with the device count replaced, and LLVM optimisation level 1 unless one is set. The
    suite compiles hundreds of programs and runs each a few tiny steps: level 1 cuts XLA
    compile time by about 30% against the default 2 (tokenformer growth test: 51.6 s -> 36.4 s of
    compiles) with no slower training at these sizes (ViT shapes test 54 s -> 50 s); level 0
    halves compiles but makes the longer training tests 40% slower."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    if not any("xla_backend_optimization_level" in f for f in flags):
        flags.append("--xla_backend_optimization_level=1")
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


os.environ["XLA_FLAGS"] = xla_flags(8)

# One persistent XLA compilation cache for the whole run, shared by the pytest-xdist workers
# (they inherit this process's environment) and by the CLI subprocesses the tests start, which
# compile the same train step again and again (resume, kill -9, two processes). It starts empty
# (a run measures cold compiles, as CI does) and is removed at the end; a cache the user set
# (JAX_COMPILATION_CACHE_DIR) is used and kept.
_RUN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _RUN_CACHE = tempfile.mkdtemp(prefix="polyformer-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE

import attention  # noqa: E402,F401  (sets its XLA:CPU workaround flag before jax starts)

import dataclasses  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_CONFIG = os.path.join(REPO_ROOT, "configs", "lm.py")
TINY = f"{LM_CONFIG}:tiny"

# Small and fast, but every optimizer step changes the parameters (warmup 0: the first step's
# learning rate is not 0), so comparisons after a few steps see the updates.
TEST_OVERRIDES = (
    "train.steps=3",
    "train.warmup_steps=0",
    "train.log_every=1",
    "eval.every=0",
    "eval.batches=2",
    "checkpoint.every=0",
    "sample.max_new_tokens=0",
    "model.num_layers=1",
    "data.seq_len=32",
)


def make_tiny_config(*overrides: str):
    """configs/lm.py:tiny with TEST_OVERRIDES, then `overrides` ("a.b=value" strings)."""
    from trainer import load_config
    return load_config(TINY, [*TEST_OVERRIDES, *overrides])


@pytest.fixture
def tiny_config():
    """Factory: tiny_config("mesh.data=2", "train.steps=4") -> a locked ConfigDict."""
    return make_tiny_config


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:  # the controller (or the only process), after every worker
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, (
        f"the tests need 8 (simulated) devices, got {jax.device_count()}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS')!r} was set after jax initialised its backend")


# ----------------------------------------------------------------------------- running
def param_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as host numpy arrays keyed by path (safe after donation)."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in leaves}


@dataclasses.dataclass
class Run:
    result: dict[str, Any]  # what fit() returned
    losses: dict[int, float]  # train loss of every logged step
    train_metrics: dict[int, dict[str, float]]  # all train metrics of every logged step
    params: dict[str, np.ndarray]  # final parameters
    workdir: str = ""
    compiled: list[str] = dataclasses.field(default_factory=list)  # names XLA compiled, if recorded
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)  # example ids, batch by batch


def run_trainer(config, workdir, *, max_steps: int | None = None, devices=None) -> Run:
    """Trainer(config, workdir, devices).fit(max_steps), recording the train metrics of every
    logged step and the example ids of every train batch."""
    import trainer.trainer as trainer_module
    from trainer import Trainer

    metrics: dict[int, dict[str, float]] = {}
    ids: list[np.ndarray] = []
    device_batch = trainer_module.Trainer._device_batch

    def recording_device_batch(self, local):
        ids.append(np.array(local["id"]))
        return device_batch(self, local)

    class RecordingReporter(trainer_module.Reporter):
        def scalars(self, step, values, prefix=""):
            if prefix == "train/":
                metrics[step] = {k: float(v) for k, v in values.items()}
            super().scalars(step, values, prefix)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "Reporter", RecordingReporter)
        mp.setattr(trainer_module.Trainer, "_device_batch", recording_device_batch)
        with Trainer(config, str(workdir), quiet=True, devices=devices) as t:
            result = t.fit(max_steps=max_steps)
            params = param_arrays(t.model)
    return Run(result=result, losses={s: m["loss"] for s, m in metrics.items()},
               train_metrics=metrics, params=params, workdir=str(workdir), ids=ids)


def load_bench(name: str):
    """bench/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(root, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps_on_disk(workdir) -> list[int]:
    """The checkpoint steps a workdir holds (a fresh Checkpoints: what a restart would see)."""
    from trainer.checkpoint import Checkpoints
    c = Checkpoints(str(workdir), async_save=False)
    try:
        return c.all_steps()
    finally:
        c.close()


def assert_params_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)


def jit_apply(module, fn, *args):
    """fn(module, *args) under one jax.jit (the module's state passed as an argument)."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def check_sparse_prefill_lm(make_model_cfg, small: dict, budget_field: str) -> None:
    """A training-free sparse prefill mechanism in the tiny LM: it loads the softmax LM's
    parameters unchanged; with a full budget its prefill (and train) logits equal the softmax
    LM's; with a small budget prefill is sparse (first generated logits differ) and generation
    runs; the attention cost it sows at prefill (what bench/sparse.py reads) is every causal pair
    with the full budget and fewer with the small one.

    make_model_cfg(**fields) -> config.model with the mechanism selected; small: its options
    for short blocks; budget_field: the option setting the selection budget in tokens."""
    import jax.numpy as jnp

    from models.lm import LM, generate
    from trainer import load_config

    soft = LM(load_config(TINY, []).model, rngs=nnx.Rngs(0))
    B, P = 2, 96
    prompt = jax.random.randint(jax.random.key(4), (B, P), 0, 256, jnp.int32)
    lms = {}
    for budget in (4096, 16):
        lms[budget] = LM(make_model_cfg(**small, **{budget_field: budget}), rngs=nnx.Rngs(1))
        nnx.update(lms[budget], nnx.state(soft, nnx.Param))

    def logits(lm, tokens):
        return lm(tokens)[0], lm(tokens, cache=lm.init_cache(B, P), mode="prefill")[0]

    dense, _ = jit_apply(soft, logits, prompt)
    full_train, full_pre = jit_apply(lms[4096], logits, prompt)
    np.testing.assert_allclose(full_pre, dense, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(full_train, dense, atol=1e-5, rtol=1e-5)
    tok, gen_logits = generate(lms[16], prompt, 3, return_logits=True)
    assert tok.shape == (B, 3) and np.all(np.isfinite(np.asarray(gen_logits)))
    assert float(jnp.max(jnp.abs(gen_logits[:, 0] - dense[:, -1]))) > 1e-4  # sparse prefill
    heads, layers = soft.blocks[0].attn.num_heads, len(soft.blocks)
    for budget, lm in lms.items():
        _, inter = jit_apply(lm, lambda lm, t: nnx.capture(lm, nnx.Intermediate)(
            t, cache=lm.init_cache(B, P), mode="prefill"), prompt)
        pairs = [v for path, v in jax.tree_util.tree_flatten_with_path(inter)[0]
                 if any(getattr(k, "key", None) == "attention_pairs" for k in path)]
        assert len(pairs) == layers and all(p.shape == () for p in pairs)  # per sequence
        total, dense_pairs = float(sum(pairs)), layers * heads * P * (P + 1) / 2
        assert total == dense_pairs if budget == 4096 else total < dense_pairs


def assert_decode_matches_recompute(layer, x, prompt_len: int, *, atol: float = 1e-5):
    """A self-attention layer (registry call contract): prefill x[:, :prompt_len], then decode
    the rest token by token with the cache == one train-mode pass over x [B, T, D]."""
    import jax.numpy as jnp

    B, T = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    full = layer(x, positions=positions)[0]
    cache = layer.init_cache(B, T)
    y, cache = layer(x[:, :prompt_len], positions=positions[:, :prompt_len], cache=cache,
                     mode="prefill")
    outs = [y]
    for t in range(prompt_len, T):
        y, cache = layer(x[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache,
                         mode="decode")
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=atol, rtol=atol)
