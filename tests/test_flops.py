"""Model FLOPs (MFU) against hardware FLOPs (HFU), and the Pallas kernels' declared costs against
their analytic counts.

MFU counts the model's work once: 3x the matrix products of its forward (PaLM / MaxText: 6 N per
token for the dense part plus the attention term), whatever the compiled step recomputes; HFU is
the compiled program's count (rematerialisation included). XLA cannot see inside a Pallas call,
so both take a kernel's FLOPs from its cost estimate: checked here against the chunk form of GLA
and the block count of block-sparse attention, written independently of the kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from jax.experimental import pallas as pl

from attention.ops.block_sparse import BlockMask, block_sparse_attention
from attention.ops.gla import gla
from trainer import perf
from trainer.cli import load_config
from trainer.trainer import Trainer


def _flops(f, *args) -> float:
    return perf.matmul_flops(jax.make_jaxpr(f)(*args))


def test_matmul_flops_counts_every_construct_once():
    x = jnp.ones((8, 8))
    mm = 2 * 8**3
    assert _flops(lambda a: a @ a, x) == mm
    assert _flops(lambda a: jnp.einsum("bij,bjk->bik", a, a), jnp.ones((3, 4, 4))) == 3 * 2 * 4**3
    # a scan's body times its length; a cond's costlier branch; remat's body once (the forward)
    scan = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]
    assert _flops(scan, x) == 5 * mm
    cond = lambda a: jax.lax.cond(a.sum() > 0, lambda b: b @ b @ b, lambda b: b @ b, a)
    assert _flops(cond, x) == 2 * mm
    assert _flops(jax.checkpoint(lambda a: a @ a), x) == mm
    assert _flops(jax.jit(lambda a: a @ a), x) == mm  # nested jit

    @jax.custom_vjp
    def f(a):
        return a @ a
    f.defvjp(lambda a: (a @ a, a), lambda a, g: (g @ a.T + a.T @ g,))
    assert _flops(f, x) == mm
    # a Pallas kernel is what it declares (its body is not counted)
    kernel = pl.pallas_call(
        lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] @ x_ref[...]),
        out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32), interpret=True,
        cost_estimate=pl.CostEstimate(flops=12345, transcendentals=0, bytes_accessed=0))
    assert _flops(kernel, x) == 12345
    # a convolution: each output element a dot over C_in x the window
    conv = lambda a, w: jax.lax.conv_general_dilated(
        a, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert _flops(conv, jnp.ones((2, 16, 16, 3)), jnp.ones((4, 4, 3, 8))) == 2 * (2 * 7 * 7 * 8) * (4 * 4 * 3)
    # a shard_map's per-shard count times its shards
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    spec = jax.sharding.PartitionSpec("a", "b")
    sharded = jax.shard_map(lambda a: a @ a.T, mesh=mesh, in_specs=spec, out_specs=spec)
    rows = jax.sharding.PartitionSpec("a")  # whole along b: its 4 devices repeat the work
    by_rows = jax.shard_map(lambda a: a @ a.T, mesh=mesh, in_specs=rows, out_specs=rows,
                            check_vma=False)
    with jax.set_mesh(mesh):
        y = jax.device_put(jnp.ones((8, 16)), jax.sharding.NamedSharding(mesh, spec))
        assert _flops(sharded, y) == 8 * (2 * 4 * 4 * 4)
        y = jax.device_put(jnp.ones((8, 16)), jax.sharding.NamedSharding(mesh, rows))
        assert _flops(by_rows, y) == 2 * (2 * 4 * 4 * 16)


def _dry_run(*overrides):
    config = load_config(TINY, list(overrides))
    with Trainer(config, "/nonexistent/never_created", dry_run=True) as t:
        report = t.dry_run()
    return t, report, config


def test_model_flops_are_palms_and_hardware_flops_add_rematerialisation():
    """The tiny LM (GQA, SwiGLU, tied head, T within one attention block: the full T x T scores):
    model FLOPs = 6 N tokens + 12 L H d_head T tokens exactly (PaLM, appendix B), N the matmul
    parameters (the tied head counted, the embedding lookup not); rematerialising the blocks
    raises the compiled (HFU) count and leaves the model's (MFU) unchanged."""
    t, report, cfg = _dry_run()
    m, T, B = cfg.model, cfg.data.seq_len, cfg.train.global_batch_size
    d, H, Hkv, dh = m.d_model, m.num_heads, m.num_kv_heads, m.d_model // m.num_heads
    n = m.num_layers * (d * H * dh + 2 * d * Hkv * dh + H * dh * d + 3 * d * m.mlp_dim) + 256 * d
    tokens = B * T
    assert t.model_flops == 6 * n * tokens + 12 * m.num_layers * H * dh * T * tokens
    assert t.step_flops > t.model_flops  # the compiled step adds elementwise work
    remat, remat_report, _ = _dry_run("train.remat=True")
    assert remat.model_flops == t.model_flops
    assert remat.step_flops > 1.15 * t.step_flops  # the blocks' forward, again
    assert f"the model's: {t.model_flops / 1e9:,.2f} GFLOP" in report
    # gradient accumulation: twice the batch in two micro-steps, twice the model FLOPs
    accum, _, _ = _dry_run("train.global_batch_size=16", "train.grad_accum_steps=2")
    assert accum.model_flops == 2 * t.model_flops


def test_training_logs_mfu_and_hfu(tmp_path):
    """The plumbing: both figures logged, from the trainer's two FLOP counts."""
    config = load_config(TINY, ["train.steps=4", "train.log_every=2", "eval.every=0",
                                "checkpoint.every=0", "train.remat=True"])
    with Trainer(config, str(tmp_path / "run")) as t:
        t.fit()
        metrics = t.last_train["metrics"]
    assert 0 < metrics["perf/mfu"] < metrics["perf/hfu"]
    assert metrics["perf/hfu"] / metrics["perf/mfu"] == pytest.approx(t.step_flops / t.model_flops)


def _gla_inputs(B, T, H, K, V):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k = (jax.random.normal(ks[i], (B, T, H, K)) for i in (0, 1))
    v = jax.random.normal(ks[2], (B, T, H, V))
    log_g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
    return q, k, v, log_g


@pytest.mark.parametrize("B,T,H,K,V,C", [(2, 128, 3, 16, 32, 64), (1, 100, 2, 8, 24, 32)])
def test_gla_kernels_declare_the_chunk_forms_flops(B, T, H, K, V, C):
    """Chunkwise GLA (PAPERS.md; fla's chunk form) per head and token, with T padded to the
    chunk: the state pass K^T V (2 K V), the output's inter-chunk Q S (2 K V) and the causal half
    of its intra-chunk Q K^T and A V (C K + C V); the backward twice the forward (each product's
    two input gradients) plus the state pass it recomputes rather than store [N, K, V] states."""
    args = _gla_inputs(B, T, H, K, V)
    run = lambda *a: gla(*a, chunk_size=C, impl="pallas")[0].sum()
    tokens = B * H * (-(-T // C) * C)
    forward = tokens * (4 * K * V + C * (K + V))
    assert _flops(run, *args) == forward
    recomputed = tokens * 2 * K * V
    assert _flops(jax.value_and_grad(run, argnums=(0, 1, 2, 3)), *args) == 3 * forward + recomputed


@pytest.mark.parametrize("causal,bq,bk", [(False, 16, 16), (True, 16, 16), (True, 12, 20)])
def test_block_sparse_kernels_declare_their_blocks_flops(causal, bq, bk):
    """Flash attention over the active blocks: 2 products a block forward (Q K^T, P V), 3 for
    dq (recomputing S and dP, then dS K) and 4 for dk / dv (S, dP, P^T dO, dS^T Q), each
    2 block_q block_k D. A mask with m active blocks in every query row costs B H NQ m of them
    forward and in dq; dk / dv run over key rows, whose grid has as many slots as the fullest
    key row (a static bound: the mask is data; empty slots are skipped, not computed). Blocks of
    12 and 20 tokens run in tiles of 16 and 24 rows: the count is the tokens', not the tiles'."""
    B, T, S, H, D, m = 2, 96, 80, 2, 16, 3
    rng = np.random.default_rng(0)
    nq, nk = T // bq, S // bk
    dense = np.zeros((B, H, nq, nk), bool)
    for row in dense.reshape(-1, nk):
        row[rng.choice(nk, m, replace=False)] = True
    mask = BlockMask.from_dense(jnp.asarray(dense), bq, bk, q_len=T, k_len=S)
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(key, (B, S, H, D)) for key in ks[1:])
    run = lambda q, k, v: block_sparse_attention(q, k, v, mask, causal=causal,
                                                 impl="pallas").sum()
    block = 2 * bq * bk * D
    blocks = B * H * nq * m
    assert _flops(run, q, k, v) == 2 * block * blocks
    fullest_key_row = dense.sum(axis=2).max()
    dkv_slots = B * H * nk * fullest_key_row
    assert dkv_slots > blocks  # this mask's key rows are uneven: the bound is not the count
    assert _flops(jax.value_and_grad(run, argnums=(0, 1, 2)), q, k, v) == (
        (2 + 3) * block * blocks + 4 * block * dkv_slots)


def test_gpu_arrangements_declare_the_unpadded_flops():
    """On GPU the head dims are zero-padded to powers of two (K 8 -> 16, V 24 -> 32, D 24 ->
    32), blocks to power-of-two tiles, blocks over 128 tokens split: the declared costs still
    count the model's dims and tokens, equal to the TPU arrangement's."""
    from pallas_kernels.block_sparse import block_sparse_pallas
    from pallas_kernels.gla import gla_pallas

    args = _gla_inputs(1, 100, 2, 8, 24)
    for grad in (False, True):
        counts = []
        for gpu in (False, True):
            run = lambda *a: gla_pallas(*a, scale=0.5, chunk_size=32, interpret=True,
                                        gpu=gpu)[0].sum()  # noqa: B023
            counts.append(_flops(jax.value_and_grad(run, argnums=(0, 1, 2, 3)) if grad else run,
                                 *args))
        assert counts[0] == counts[1] > 0
    B, T, H, D = 1, 300, 2, 24
    dense = np.random.default_rng(0).random((1, H, 2, 2)) < 0.7
    dense[..., 0] = True
    mask = BlockMask.from_dense(jnp.asarray(dense), 150, 150, q_len=T, k_len=T)  # split in 2
    ks = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (B, T, H, D)) for key in ks)
    fwd = [_flops(lambda q, k, v: block_sparse_pallas(q, k, v, mask, causal=False, scale=0.2,  # noqa: B023
                                                      interpret=True, gpu=gpu)[0].sum(), q, k, v)
           for gpu in (False, True)]
    slots = B * H * mask.num_q_blocks * mask.max_blocks  # the grid's (a bound, as above)
    assert fwd[0] == fwd[1] == 2 * 2 * 150 * 150 * D * slots
