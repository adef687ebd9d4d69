"""TokenFormer: Pattention against plain numpy, growth by zero parameter tokens preserving the
function (layer and whole LM), shrinking refused, and the tiny config through the trainer."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.pattention import GROWTH_PRESERVING, NORMS, Pattention, grow_pattention
from conftest import REPO_ROOT, run_trainer

CONFIG = os.path.join(REPO_ROOT, "configs", "tokenformer.py")
_erf = np.vectorize(math.erf)


def np_gelu(a):
    return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))


def np_pattention(x, k, v, norm, zoom):
    """The paper's Theta(X K_P^T) V_P in float64 numpy (TokenFormer eq. 5 and its variants)."""
    x, k, v = (np.asarray(t, np.float64) for t in (x, k, v))
    a = x @ k.T
    if norm == "softmax":
        e = np.exp(a - a.max(-1, keepdims=True))
        w = zoom * e / e.sum(-1, keepdims=True)
    elif norm == "l2_norm_gelu":
        w = np_gelu(a / np.linalg.norm(a, axis=-1, keepdims=True) * zoom)
    else:
        g = np_gelu(a)
        w = g / np.linalg.norm(g, axis=-1, keepdims=True) * zoom
    return w @ v


def layer(n, norm, zoom=0.0, seed=0, d_in=12, d_out=10):
    # std 0.5: scores of order 1, so the normalisations are far from linear
    return Pattention(d_in, d_out, n, norm=norm, zoom=zoom, key_std=0.5, value_std=0.5,
                      rngs=nnx.Rngs(seed))


def params(p):
    return np.asarray(p.key_param_tokens[...]), np.asarray(p.value_param_tokens[...])


X = jax.random.normal(jax.random.key(7), (3, 5, 12))


def test_softmax_mode_equals_n_softmax():
    n = 16
    p = layer(n, "softmax")
    assert p.zoom == n  # the default zoom of softmax mode: n softmax(X K_P^T) V_P
    k, v = params(p)
    a = np.asarray(X, np.float64) @ k.T
    e = np.exp(a - a.max(-1, keepdims=True))
    want = n * (e / e.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(p(X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_pattention_equals_numpy_reference(norm):
    p = layer(16, norm)
    assert p.zoom == (16.0 if norm == "softmax" else 4.0)
    np.testing.assert_allclose(p(X), np_pattention(X, *params(p), norm, p.zoom),
                               rtol=1e-5, atol=1e-5)


def grown(p, new_n, seed=1):
    """A Pattention with new_n tokens and p's zoom holding p's parameters grown by zeros."""
    q = layer(new_n, p.norm, zoom=p.zoom, seed=seed)
    nnx.update(q, grow_pattention(nnx.state(p, nnx.Param), new_n))
    return q


@pytest.mark.parametrize("factor", (1.5, 2.0))
@pytest.mark.parametrize("norm", GROWTH_PRESERVING)
def test_growth_with_zero_tokens_preserves_output(norm, factor):
    n = 16
    new_n = int(n * factor)
    p = layer(n, norm)
    q = grown(p, new_n)
    k, v = params(q)
    assert k.shape == (new_n, 12) and v.shape == (new_n, 10)
    np.testing.assert_array_equal(k[:n], params(p)[0])  # old tokens in the first rows
    assert not k[n:].any() and not v[n:].any()  # new tokens start at zero
    np.testing.assert_allclose(q(X), p(X), rtol=1e-6, atol=1e-6)
    # the check can fail: a non-zero new token, or the zoom recomputed at the new size
    # (the reference's sqrt(n_current)), changes the function
    bumped = layer(new_n, norm, zoom=p.zoom)
    nnx.update(bumped, grow_pattention(nnx.state(p, nnx.Param), new_n))
    bumped.key_param_tokens[...] = bumped.key_param_tokens[...].at[n:].set(1.0)
    bumped.value_param_tokens[...] = bumped.value_param_tokens[...].at[n:].set(1.0)
    assert float(jnp.max(jnp.abs(bumped(X) - p(X)))) > 1e-3
    rezoomed = layer(new_n, norm)  # zoom = default at new_n
    nnx.update(rezoomed, nnx.state(q, nnx.Param))
    assert float(jnp.max(jnp.abs(rezoomed(X) - p(X)))) > 1e-3


@pytest.mark.parametrize("factor", (1.5, 2.0))
def test_softmax_growth_rescales_rows(factor):
    """softmax mode is not growth-preserving: each zero key adds exp(0) = 1 to the softmax
    denominator, so O_new = O_old * S / (S + m) with S = sum_j exp(A_j) over the old tokens."""
    n = 16
    m = int(n * factor) - n
    p = layer(n, "softmax")
    q = grown(p, n + m)
    k, _ = params(p)
    s = np.exp(np.asarray(X, np.float64) @ k.T).sum(-1, keepdims=True)
    np.testing.assert_allclose(q(X), np.asarray(p(X)) * s / (s + m), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(q(X) - p(X)))) > 1e-3


def test_shrinking_raises():
    p = layer(16, "l2_norm_gelu")
    with pytest.raises(ValueError, match=r"cannot shrink .*key_param_tokens.* from 16 to 8"):
        grow_pattention(nnx.state(p, nnx.Param), 8)


# ----------------------------------------------------------------------------- the LM
def tiny(*overrides):
    from trainer import load_config
    return load_config(f"{CONFIG}:tiny", list(overrides))


def lm_logits_and_loss(model, tokens):
    def fn(state, tokens):
        m = nnx.merge(graphdef, state)
        logits, _ = m(tokens[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
        return logits, nll.mean()
    graphdef, state = nnx.split(model)
    return jax.jit(fn)(state, tokens)


@pytest.mark.parametrize("norm", GROWTH_PRESERVING)
def test_grown_lm_equals_original(norm):
    from models.tokenformer import TokenFormer, grow_tokenformer

    # the config's zooms (set at the initial counts) stay fixed in the grown configs
    c = tiny(f"model.pattention_norm={norm}")
    small = TokenFormer(c.model, rngs=nnx.Rngs(0))
    # random (not zero-initialised) so every Pattention shapes the logits
    tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, 256, jnp.int32)
    logits, loss = lm_logits_and_loss(small, tokens)
    n, n_ffn = c.model.param_tokens, c.model.ffn_param_tokens
    for factor in (1.5, 2.0):
        new_n, new_ffn = int(n * factor), int(n_ffn * factor)
        big_cfg = tiny(f"model.pattention_norm={norm}", f"model.param_tokens={new_n}",
                       f"model.ffn_param_tokens={new_ffn}")
        assert big_cfg.model.pattention_zoom == c.model.pattention_zoom
        big = TokenFormer(big_cfg.model, rngs=nnx.Rngs(1))
        nnx.update(big, grow_tokenformer(nnx.state(small, nnx.Param), param_tokens=new_n,
                                         ffn_param_tokens=new_ffn))
        shapes = {jax.tree_util.keystr(p): x.shape for p, x in
                  jax.tree_util.tree_flatten_with_path(nnx.state(big, nnx.Param))[0]}
        for path, shape in shapes.items():  # every projection grew to its new count
            if "param_tokens" in path:
                assert shape[0] == (new_ffn if "'ffn'" in path else new_n), path
        big_logits, big_loss = lm_logits_and_loss(big, tokens)
        np.testing.assert_allclose(big_logits, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(big_loss, loss, rtol=1e-6)
    # the check can fail: the model built at the large size without the grown state differs
    other = TokenFormer(big_cfg.model, rngs=nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(lm_logits_and_loss(other, tokens)[0] - logits))) > 1e-3


def test_lm_shrinking_and_non_tokenformer_raise():
    from models.tokenformer import TokenFormer, grow_tokenformer

    c = tiny()
    state = nnx.state(TokenFormer(c.model, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"cannot shrink .*ffn.* from 128 to 64"):
        grow_tokenformer(state, param_tokens=64, ffn_param_tokens=64)
    with pytest.raises(ValueError, match="not a TokenFormer"):
        grow_tokenformer({"embed": np.zeros(3)}, param_tokens=64, ffn_param_tokens=128)


def test_task_registered_and_validates():
    from trainer import load_config
    from trainer.config import ConfigError
    from trainer.task import get_task

    task_cls = get_task("tokenformer")
    mesh = {"data": 8, "fsdp": 1, "tensor": 1}
    task_cls(tiny()).validate(mesh)
    with pytest.raises(ConfigError, match="pattention_norm"):
        task_cls(tiny("model.pattention_norm=relu")).validate(mesh)
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(f"{CONFIG}:huge")


def test_tiny_config_trains(tmp_path):
    """Through the real trainer on a data x tensor mesh: the parameter tokens are split over
    the tensor axis (LOGICAL_RULES "param_tokens")."""
    config = tiny("train.steps=6", "train.warmup_steps=0", "train.log_every=1", "eval.every=0",
                  "eval.batches=2", "checkpoint.every=0", "sample.max_new_tokens=0",
                  "data.seq_len=32", "mesh.data=4", "mesh.tensor=2")
    run = run_trainer(config, tmp_path)
    losses = [run.losses[s] for s in sorted(run.losses)]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(math.log(256), rel=0.25)  # near uniform over bytes at init
    assert min(losses[-2:]) < losses[0]
    assert any("param_tokens" in k for k in run.params)
