"""Pallas GLA kernels (interpret mode on CPU) against the token-by-token recurrence.

Reference: S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,  o_t = (scale q_t) S_t, run with
`lax.scan` in f32. Checked: o, the final state, and the gradients w.r.t. q, k, v, log_g and the
initial state under random cotangents for o and the final state.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import gla_pallas

HI = jax.lax.Precision.HIGHEST
NAMES = ("o", "final_state", "dq", "dk", "dv", "dlog_g", "dinitial_state")


def run_jitted(fn, *args):
    """jit(fn)(*args), compiled without LLVM's backend optimisations: interpret-mode kernels are
    large loops whose compile time, not run time, dominates these tests (about 2x faster)."""
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


def reference_gla(q, k, v, log_g, scale, initial_state):
    """The recurrence, one token at a time, in f32. [B, T, H, *] in; (o, final state) out."""
    q, k, v, log_g = (jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v, log_g))

    def step(state, x):
        q_t, k_t, v_t, g_t = x  # [B, H, K] / [B, H, V]
        state = state * jnp.exp(g_t)[..., None] + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", scale * q_t, state, precision=HI)

    final, o = jax.lax.scan(step, initial_state, (q, k, v, log_g))
    return jnp.swapaxes(o, 0, 1), final


def make_inputs(seed, b, t, h, kd, vd, decay, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (b, t, h, kd))
    k = jax.random.normal(ks[1], (b, t, h, kd))
    v = jax.random.normal(ks[2], (b, t, h, vd))
    if decay == "weak":  # the GLA layer's gate: logsigmoid(x) / 16
        log_g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, kd))) / 16
    else:  # about -7 per step: e^{-7 * 64} underflows, so naive e^{-b} factors would overflow
        log_g = -7.0 * jax.random.uniform(ks[3], (b, t, h, kd), minval=0.5, maxval=1.5)
    h0 = jax.random.normal(ks[4], (b, h, kd, vd))
    do = jax.random.normal(ks[5], (b, t, h, vd))
    dfinal = jax.random.normal(ks[6], (b, h, kd, vd))
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    return (q, k, v, log_g, h0), (do, dfinal)


def run_pallas(primals, cotangents, *, with_initial, with_final, chunk_size=64, **options):
    """(o, final or None, dq, dk, dv, dlog_g, dinitial or None) of gla_pallas, jitted; options:
    more keyword arguments of gla_pallas."""
    q, k, v, log_g, h0 = primals
    do, dfinal = cotangents
    scale = q.shape[-1] ** -0.5

    def go(q, k, v, log_g, h0, do, dfinal):
        def f(q, k, v, log_g, h0):
            return gla_pallas(q, k, v, log_g, scale=scale,
                              initial_state=h0 if with_initial else None,
                              output_final_state=with_final, chunk_size=chunk_size, **options)
        (o, final), vjp = jax.vjp(f, q, k, v, log_g, h0)
        assert (final is not None) == with_final
        grads = vjp((do, dfinal if with_final else None))
        return (o, final, *grads)

    out = list(run_jitted(go, q, k, v, log_g, h0, do, dfinal))
    if not with_initial:
        out[6] = None
    return out


def run_reference(primals, cotangents, *, with_initial, with_final):
    """Same outputs from the recurrence, in f32, on the (upcast) same inputs."""
    q, k, v, log_g, h0 = (x.astype(jnp.float32) for x in primals)
    do, dfinal = (x.astype(jnp.float32) for x in cotangents)
    scale = q.shape[-1] ** -0.5
    if not with_initial:
        h0 = jnp.zeros_like(h0)
    if not with_final:
        dfinal = jnp.zeros_like(dfinal)

    def go(q, k, v, log_g, h0, do, dfinal):
        (o, final), vjp = jax.vjp(lambda *a: reference_gla(*a[:4], scale, a[4]), q, k, v, log_g, h0)
        return (o, final, *vjp((do, dfinal)))

    out = list(run_jitted(go, q, k, v, log_g, h0, do, dfinal))
    if not with_final:
        out[1] = None
    if not with_initial:
        out[6] = None
    return out


def scaled_max_error(x, ref):
    """max |x - ref| relative to the scale of ref (its largest magnitude)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def relative_rmse(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / max(np.mean(ref ** 2), 1e-30)))


def assert_all_close(got, want, tol, metric=scaled_max_error, tol_dlog_g=None):
    assert len(got) == len(want) == len(NAMES)
    tols = {name: tol for name in NAMES}
    if tol_dlog_g is not None:
        tols["dlog_g"] = tol_dlog_g
    errors = {}
    for name, x, ref in zip(NAMES, got, want):
        assert (x is None) == (ref is None), name
        if x is None:
            continue
        assert x.shape == ref.shape, (name, x.shape, ref.shape)
        assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), f"{name} is not finite"
        errors[name] = metric(x, ref)
    bad = {n: e for n, e in errors.items() if not e <= tols[n]}
    assert not bad, f"errors above {tols}: {bad} (all: {errors})"


# f32 tolerance on max |error| / max |reference|. Under strong decay, d log_g is held to 5e-5:
# the kernels see e^{b_r - b_s} through b, the within-chunk cumulative sum of log_g, which reaches
# about -450 at the end of a 64-chunk, where f32's spacing is 3e-5; d log_g (a sum of the small
# differences q dq - k dk) inherits that relative error while the recurrence multiplies exp(log_g)
# step by step. Everything else, and d log_g under the GLA layer's weak decay, stays near 1e-6.
F32_TOL = 1e-5
F32_TOL_DLOG_G_STRONG = 5e-5

# (B, T, K, V, decay, with_initial_state, output_final_state): every T in {1, 63, 64, 200},
# K in {16, 60} and V in {24, 64}, both decays, both flags, in a handful of combinations.
F32_CASES = [
    (2, 1, 16, 24, "weak", True, True),
    (1, 63, 60, 64, "weak", True, True),
    (1, 64, 16, 64, "strong", True, False),
    (1, 200, 60, 24, "strong", False, True),
    (2, 200, 16, 64, "weak", False, False),
    (1, 63, 16, 24, "strong", True, True),
    (1, 64, 60, 24, "weak", False, True),
]


def check_f32_against_recurrence(seed, b, t, kd, vd, decay, with_initial, with_final, **options):
    """gla_pallas(**options) vs the recurrence at f32 tolerances: o, final state, all gradients."""
    primals, cotangents = make_inputs(seed, b, t, 2, kd, vd, decay)
    flags = dict(with_initial=with_initial, with_final=with_final)
    got = run_pallas(primals, cotangents, **flags, **options)
    want = run_reference(primals, cotangents, **flags)
    assert got[0].dtype == jnp.float32 and got[0].shape == (b, t, 2, vd)
    strong = decay == "strong"
    assert_all_close(got, want, tol=F32_TOL, tol_dlog_g=F32_TOL_DLOG_G_STRONG if strong else None)


@pytest.mark.parametrize("b,t,kd,vd,decay,with_initial,with_final", F32_CASES)
def test_chunked_kernels_equal_recurrence_f32(b, t, kd, vd, decay, with_initial, with_final):
    check_f32_against_recurrence(t * 7 + kd, b, t, kd, vd, decay, with_initial, with_final)


@pytest.mark.parametrize("decay", ["weak", "strong"])
def test_bf16_inputs_match_f32_reference(decay):
    primals, cotangents = make_inputs(3, 1, 100, 2, 60, 64, decay, dtype=jnp.bfloat16)
    flags = dict(with_initial=True, with_final=True)
    got = run_pallas(primals, cotangents, **flags)
    want = run_reference(primals, cotangents, **flags)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert got[2].dtype == got[3].dtype == got[4].dtype == jnp.bfloat16
    assert_all_close(got, want, tol=5e-3, metric=relative_rmse)


def test_result_independent_of_chunk_size():
    primals, cotangents = make_inputs(5, 1, 100, 2, 16, 24, "weak")
    # a mix of weak and strong decay along the key dims
    q, k, v, log_g, h0 = primals
    primals = (q, k, v, log_g.at[..., ::3].set(-7.0), h0)
    flags = dict(with_initial=True, with_final=True)
    want = run_reference(primals, cotangents, **flags)
    results = {c: run_pallas(primals, cotangents, chunk_size=c, **flags) for c in (16, 32, 64)}
    for got in results.values():
        assert_all_close(got, want, tol=F32_TOL, tol_dlog_g=F32_TOL_DLOG_G_STRONG)
    for got in (results[16], results[32]):
        assert_all_close(got, results[64], tol=F32_TOL, tol_dlog_g=F32_TOL_DLOG_G_STRONG)


def test_splitting_the_sequence_carries_the_state():
    """run(x1 || x2) == run(x2, initial_state = final(x1)), split inside a chunk."""
    (q, k, v, log_g, h0), _ = make_inputs(9, 1, 80, 2, 16, 24, "weak")

    def split_and_whole(q, k, v, log_g, h0):
        def run(sl, state):
            return gla_pallas(q[:, sl], k[:, sl], v[:, sl], log_g[:, sl], scale=0.25,
                              initial_state=state, output_final_state=True)
        o1, final1 = run(slice(0, 37), h0)
        o2, final2 = run(slice(37, None), final1)
        return jnp.concatenate([o1, o2], axis=1), final2, *run(slice(None), h0)

    o_split, final_split, o_all, final_all = run_jitted(split_and_whole, q, k, v, log_g, h0)
    assert scaled_max_error(o_split, o_all) <= F32_TOL
    assert scaled_max_error(final_split, final_all) <= F32_TOL


# the GPU arrangement: the state recurrences as kernels looping over the chunks (one program per
# batch, head and block of value rows; V = 128 -> two blocks of 64) between the two parallel
# kernels, head dims zero-padded to powers of two (K = 60 -> 64, V = 24 -> 32)
GPU_CASES = [
    (2, 1, 16, 24, "weak", True, True),
    (1, 200, 60, 24, "strong", False, True),
    (2, 130, 60, 64, "weak", True, False),
    (1, 150, 32, 128, "strong", True, True),
]


@pytest.mark.parametrize("b,t,kd,vd,decay,with_initial,with_final", GPU_CASES)
def test_gpu_arrangement_equals_recurrence(b, t, kd, vd, decay, with_initial, with_final):
    check_f32_against_recurrence(t * 5 + kd, b, t, kd, vd, decay, with_initial, with_final,
                                 gpu=True)


def test_gpu_kernels_lower_to_triton():
    """On this CPU, jax.export lowers the GPU arrangement for CUDA through Pallas's Triton
    lowering (an abstract H100; the Triton compiler itself runs only on a GPU): forward and
    backward: the four kernels as Triton calls (the state passes as in-kernel loops over the
    chunks); the sequential-grid ones refuse on GPU."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh

    from pallas_kernels import platform
    from pallas_kernels.gla import kernels

    b, t, h, kd, vd = 1, 200, 2, 60, 24
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def fwd_bwd(q, k, v, log_g, h0, do, dfinal):
        def f(*a):
            return gla_pallas(*a[:4], scale=kd ** -0.5, initial_state=a[4],
                              output_final_state=True)
        out, vjp = jax.vjp(f, q, k, v, log_g, h0)
        return out, vjp((do, dfinal))

    cuda = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    triton = "__gpu$xla.gpu.triton"
    args = (sds(b, t, h, kd), sds(b, t, h, kd), sds(b, t, h, vd), sds(b, t, h, kd),
            sds(b, h, kd, vd), sds(b, t, h, vd), sds(b, h, kd, vd))
    with platform.target_backend("gpu"), \
            jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=cuda)):
        exported = export.export(jax.jit(fwd_bwd), platforms=("cuda",), disabled_checks=[
            export.DisabledSafetyCheck.custom_call(triton)])(*args)
        text = exported.mlir_module()
        assert text.count(triton) == 5  # the forward's state pass runs again in the backward
        assert set(re.findall(r'name = "(gla_[a-z_]+)"', text)) == {
            "gla_chunk_states_loop", "gla_chunk_output", "gla_chunk_state_grads_loop",
            "gla_chunk_input_grads"}
        cfg = kernels.Config(scale=1.0, chunk=64, sub=16, interpret=False)
        with pytest.raises(NotImplementedError, match="sequential grid axis"):
            jax.eval_shape(lambda *a: kernels.chunk_states(*a, cfg), sds(1, 1, 64, 16),
                           sds(1, 1, 64, 16), sds(1, 1, 64, 16), sds(1, 1, 16, 16))
    with pytest.raises(ValueError, match="state_pass"):
        kernels.gla_core(*(jnp.zeros((1, 1, 64, 16)),) * 4, jnp.zeros((1, 1, 16, 16)),
                         cfg._replace(state_pass="cuda", interpret=True))


def test_gpu_chunk_must_be_a_power_of_two():
    """Triton's tensors need power-of-two dims: a chunk of 48 (a multiple of 16, fine on TPU)
    is refused on GPU by name, before any lowering."""
    x = jnp.zeros((1, 96, 1, 16))
    with pytest.raises(ValueError, match="power of two >= 16.*got 48"):
        gla_pallas(x, x, x, x, scale=1.0, chunk_size=48, interpret=True, gpu=True)
