"""Vision families (ViT, iFormer) and efficient probing: bidirectional registry attention
against plain numpy, iFormer's low-frequency mixer against ViT's attention, odd feature maps
through pooling and upsampling, EP against attention pooling in numpy, probes training on a
frozen backbone through the trainer, ViT on shapes above chance, and clear config errors."""
from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import attention
from conftest import REPO_ROOT, jit_apply, param_arrays, run_trainer
from models import iformer, vit
from trainer import Trainer, load_config
from trainer.config import ConfigError

VIT = os.path.join(REPO_ROOT, "configs", "vit.py")
IFORMER = os.path.join(REPO_ROOT, "configs", "iformer.py")
# short runs: warmup 0 so every step changes the trained parameters
RUN = ("train.warmup_steps=0", "train.log_every=1", "eval.every=0", "eval.batches=1",
       "checkpoint.every=0", "checkpoint.async_save=false", "data.num_eval=32")


@pytest.fixture(autouse=True)
def _logical_axes_without_mesh():
    with nnx.use_eager_sharding(False):  # parameters carry logical axes; no mesh here
        yield


def model_cfg(**fields):
    """A config.model for attention layers built outside a task."""
    base = dict(attention="softmax", d_model=32, num_heads=4, num_kv_heads=4, head_dim=0,
                num_layers=1, rope_theta=0.0, causal=False, mlp_dim=64)
    return ml_collections.ConfigDict({**base, **fields})


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_full_attention(x, attn):
    """softmax(Q K^T / sqrt(d_h)) V over all tokens, per head, then W_o, in float64 numpy."""
    w = {n: np.asarray(getattr(attn, n).kernel[...], np.float64)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = ((x @ w[n]).reshape(B, T, -1, hd) for n in ("q_proj", "k_proj", "v_proj"))
    rep = H // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    p = np_softmax(np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd))
    return np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * hd) @ w["o_proj"]


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("kv_heads", (4, 2))
def test_bidirectional_softmax_equals_full_attention(kv_heads):
    attn = attention.build("softmax", model_cfg(num_kv_heads=kv_heads), dtype=jnp.float32,
                           rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    y, _ = attn(x, positions=pos)
    np.testing.assert_allclose(y, np_full_attention(x, attn), rtol=1e-5, atol=1e-6)
    # the first token sees the last one (a causal layer's first output would not change)
    y2, _ = attn(x.at[:, -1].add(1.0), positions=pos)
    assert float(jnp.max(jnp.abs(y2[:, 0] - y[:, 0]))) > 1e-4


@pytest.mark.parametrize("config,mechanism", [(VIT, "gla"), (VIT, "hedgehog")])
def test_linear_attention_trains_in_the_encoders(config, mechanism, tmp_path):
    """GLA (both directions) and Hedgehog (unmasked) are bidirectional mechanisms: a vision
    encoder takes them (its parameters are the mechanism's) and trains a few steps (the ViT:
    iFormer's attention comes from the same registry check, and costs 50 s to compile here)."""
    assert mechanism in attention.names(bidirectional=True)
    c = load_config(f"{config}:tiny", [f"model.attention={mechanism}", "train.steps=6",
                                       "train.warmup_steps=0", "train.log_every=1",
                                       "eval.every=0", "checkpoint.every=0", "eval.batches=1"])
    run = run_trainer(c, tmp_path, devices=jax.devices()[:1])
    losses = list(run.losses.values())
    assert len(losses) == 6 and all(np.isfinite(losses)), losses
    own = "g_up" if mechanism == "gla" else "feature_map_q"
    assert any(own in name for name in run.params), sorted(run.params)[:10]


def test_only_bidirectional_mechanisms_accept_causal_false():
    assert attention.get("softmax").BIDIRECTIONAL
    for name in ("routing", "ssa", "hip", "flexprefill", "dhsa", "landmark"):
        assert attention.get(name).BIDIRECTIONAL is False, name  # subclasses: causal only
        with pytest.raises(ValueError, match="causal only"):
            attention.build(name, model_cfg(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    attn = attention.build("softmax", model_cfg(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no cache"):
        attn(jnp.zeros((1, 3, 32)), positions=jnp.zeros((1, 3), jnp.int32),
             cache=attn.init_cache(1, 3), mode="prefill")


# ----------------------------------------------------------------------------- iFormer mixers
def test_low_mixer_with_pool_1_and_all_channels_equals_vit_attention():
    cfg = model_cfg(depths=(1,))
    block = vit.Block(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    mixer = iformer.InceptionMixer(cfg, 32, 4, attention_heads=4, pool=1, dtype=jnp.float32,
                                   rngs=nnx.Rngs(1))
    assert mixer.high is None and mixer.low_dim == 32  # every channel goes to attention
    nnx.update(mixer.low.attn, nnx.state(block.attn, nnx.Param))
    x = jax.random.normal(jax.random.key(2), (2, 3, 5, 32))
    want, _ = block.attn(x.reshape(2, 15, 32), positions=vit.token_positions(2, 15))
    np.testing.assert_allclose(mixer.low(x), want.reshape(2, 3, 5, 32), rtol=1e-5, atol=1e-6)


_erf = np.vectorize(math.erf)


def np_gelu(a):
    return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))


def np_shifted(x, pad_value=0.0):
    """The nine 3 x 3-neighbourhood shifts of x [B, H, W, C] (padding 1), row-major."""
    H, W = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
    return [xp[:, i:i + H, j:j + W] for i in range(3) for j in range(3)]


def np_depthwise_conv(x, kernel):
    """3 x 3 depthwise cross-correlation, padding 1; kernel [3, 3, 1, C]."""
    return sum(s * kernel[i // 3, i % 3, 0] for i, s in enumerate(np_shifted(x)))


def test_inception_mixer_equals_numpy_reference():
    """Y_c = concat(GELU(DWConv(x_h1 W)), GELU(MaxPool(x_h2) W' + b'), LowMixer(x_l));
    Y = (Y_c + DWConv(Y_c)) W_p + b_p, with the high-frequency channels first."""
    mixer = iformer.InceptionMixer(model_cfg(depths=(1,)), 32, 4, attention_heads=1, pool=2,
                                   dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert (mixer.high_dim, mixer.low_dim) == (24, 8)
    x = jax.random.normal(jax.random.key(9), (2, 5, 7, 32))
    y, low = jit_apply(mixer, lambda m, x: (m(x), m.low(x[..., 24:])), x)
    p = {"/".join(map(str, k)): np.asarray(v[...], np.float64)
         for k, v in nnx.to_flat_state(nnx.state(mixer, nnx.Param))}
    X = np.asarray(x, np.float64)
    conv = np_gelu(np_depthwise_conv(X[..., :12] @ p["high/conv_in/kernel"],
                                     p["high/conv_dw/kernel"]))
    pool = np_gelu(np.max(np_shifted(X[..., 12:24], -np.inf), axis=0) @ p["high/pool_proj/kernel"]
                   + p["high/pool_proj/bias"])
    yc = np.concatenate([conv, pool, np.asarray(low, np.float64)], -1)
    want = (yc + np_depthwise_conv(yc, p["fuse/kernel"])) @ p["proj/kernel"] + p["proj/bias"]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def np_avg_pool(x, p):
    """Mean of each p x p window, clipped to the map (count_include_pad=False)."""
    B, H, W, C = x.shape
    out = np.zeros((B, -(-H // p), -(-W // p), C))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p].mean((1, 2))
    return out


@pytest.mark.parametrize("H,W,pool", ((7, 7, 2), (9, 5, 2), (9, 5, 3), (4, 6, 2)))
def test_odd_grids_survive_pooling_and_upsampling(H, W, pool):
    x = jax.random.normal(jax.random.key(3), (2, H, W, 8))
    np.testing.assert_allclose(iformer.avg_pool(x, pool), np_avg_pool(np.asarray(x), pool),
                               rtol=1e-5, atol=1e-6)
    up = iformer.upsample(iformer.avg_pool(x, pool), pool, H, W)
    assert up.shape == x.shape
    np.testing.assert_allclose(up[:, ::pool, ::pool], iformer.avg_pool(x, pool), rtol=1e-6)
    cfg = model_cfg(depths=(1,))
    y = jax.eval_shape(lambda x: iformer.InceptionMixer(
        cfg, 32, 4, attention_heads=2, pool=pool, dtype=jnp.float32, rngs=nnx.Rngs(0))(x),
        jnp.zeros((2, H, W, 32)))
    assert y.shape == (2, H, W, 32)


def test_iformer_backbone_on_odd_stage_grids():
    # 40 px: the stem gives 10 x 10, then 5 x 5 (pool 2 on an odd map), then 3 x 3
    c = load_config(f"{IFORMER}:tiny", ["data.image_size=40"])
    assert iformer.grid_sizes(40, 3) == [10, 5, 3]
    # abstractly (shapes only): eager initialisation compiles a program per parameter shape
    tokens, pooled = jax.eval_shape(
        lambda x: iformer.IFormer(c.model, 40, rngs=nnx.Rngs(0))(x), jnp.zeros((2, 40, 40, 3)))
    assert tokens.shape == (2, 9, 96) and pooled.shape == (2, 96)


# ----------------------------------------------------------------------------- probing
def test_ep_with_one_query_and_identity_values_is_attention_pooling():
    D = 16
    ep = vit.EfficientProbe(D, 5, num_queries=1, d_out=1, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ep.value.kernel[...] = jnp.eye(D)
    ep.queries[...] = jax.random.normal(jax.random.key(5), (1, D))
    x = jax.random.normal(jax.random.key(6), (3, 11, D))
    q, X = np.asarray(ep.queries[...], np.float64), np.asarray(x, np.float64)
    # softmax(q X^T / sqrt(D)) X
    want = np.einsum("bn,bnd->bd", np_softmax(np.einsum("d,bnd->bn", q[0], X) / math.sqrt(D)), X)
    np.testing.assert_allclose(jit_apply(ep, lambda m, x: m.pool(x), x), want, rtol=1e-5,
                               atol=1e-6)


def test_ep_queries_read_their_own_value_slices():
    D, M, d_out = 16, 4, 2
    ep = vit.EfficientProbe(D, 5, num_queries=M, d_out=d_out, dtype=jnp.float32,
                            rngs=nnx.Rngs(0))
    ep.queries[...] = jax.random.normal(jax.random.key(7), (M, D))
    x = jax.random.normal(jax.random.key(8), (3, 11, D))
    q, X = np.asarray(ep.queries[...], np.float64), np.asarray(x, np.float64)
    V = X @ np.asarray(ep.value.kernel[...], np.float64)  # [B, N, D / d_out]
    c = D // d_out // M
    want = np.concatenate([np.einsum("bn,bnc->bc", np_softmax(X @ q[m] / math.sqrt(D)),
                                     V[..., m * c:(m + 1) * c]) for m in range(M)], -1)
    got = jit_apply(ep, lambda m, x: m.pool(x), x)
    assert got.shape == (3, D // d_out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_probe_trains_on_a_frozen_backbone(tmp_path):
    """A tiny ViT trained for 2 steps, then EP and linear probes initialised from it
    (init_from, init_from_new="probe") and trained with train.trainable="^probe" through the
    trainer on 8 devices: every backbone parameter stays bit-identical, every probe parameter
    changes."""
    small = ["train.global_batch_size=16", "model.num_layers=1", "data.image_size=16", *RUN]
    src = run_trainer(load_config(f"{VIT}:tiny", ["train.steps=2", *small]), tmp_path / "src")
    assert any(k.startswith("['classifier']") for k in src.params)
    backbone = {k: v for k, v in src.params.items() if k.startswith("['backbone']")}
    for probe in ("ep", "linear"):
        c = load_config(f"{VIT}:probe_{probe}",
                        ["train.steps=3", f"init_from={tmp_path / 'src'}", *small])
        assert c.train.trainable == "^probe" and c.init_from_new == "probe"
        with Trainer(c, str(tmp_path / probe), quiet=True) as t:
            before = param_arrays(t.model)  # after init_from
            t.fit()
            after = param_arrays(t.model)
        assert backbone.keys() == {k for k in after if k.startswith("['backbone']")}
        for k, v in backbone.items():
            np.testing.assert_array_equal(before[k], v, err_msg=k)  # loaded from the source
            np.testing.assert_array_equal(after[k], v, err_msg=k)  # and frozen
        probe_keys = [k for k in after if k.startswith("['probe']")]
        assert probe_keys and not any(k.startswith("['classifier']") for k in after)
        for k in probe_keys:
            assert not np.array_equal(after[k], before[k]), k
    # a source whose backbone computes something else with the same shapes is refused
    c = load_config(f"{VIT}:probe_linear", [f"init_from={tmp_path / 'src'}", "model.pool=cls",
                                            *small])
    with pytest.raises(ConfigError, match="model.pool='cls', but the source has 'mean'"):
        with Trainer(c, str(tmp_path / "cls"), quiet=True) as t:
            t.initial_state()


# ----------------------------------------------------------------------------- training
def test_vit_learns_shapes_above_chance(tmp_path):
    """configs/vit.py:tiny on the embedded shapes through the trainer: top-1 accuracy on 512
    held-out images well above chance (1/8; 0.22 is 4.6 standard errors above it). The run
    reaches 0.33 (0.326-0.334 over seeds 0-2)."""
    c = load_config(f"{VIT}:tiny", ["data.num_eval=512", "eval.batches=16", "eval.every=0",
                                    "checkpoint.every=0", "checkpoint.async_save=false"])
    run = run_trainer(c, tmp_path, devices=jax.devices()[:1])
    acc = run.result["eval"]["accuracy"]
    assert acc >= 0.22, f"eval accuracy {acc:.3f} after {c.train.steps} steps (chance 0.125)"


# ----------------------------------------------------------------------------- config errors
def trainer_error(config_file, *overrides, tmp_path):
    with pytest.raises(ConfigError) as e:
        Trainer(load_config(config_file, list(overrides)), str(tmp_path), quiet=True)
    return str(e.value)


def test_num_classes_must_match_the_data(tmp_path):
    msg = trainer_error(f"{VIT}:tiny", "model.num_classes=5", tmp_path=tmp_path)
    assert "model.num_classes=5" in msg and "8 classes" in msg
    from models.images import write_image_folder
    root = str(tmp_path / "folder")
    for split in ("train", "val"):
        write_image_folder(os.path.join(root, split), num_per_class=1, image_size=16)
        for kind in sorted(os.listdir(os.path.join(root, split)))[3:]:  # keep three classes
            shutil.rmtree(os.path.join(root, split, kind))
    msg = trainer_error(f"{VIT}:tiny", f"data.paths={root}", tmp_path=tmp_path)
    assert "model.num_classes=8" in msg and "3 classes" in msg and "num_classes=3" in msg


@pytest.mark.parametrize("mechanism", ("routing", "ssa"))
def test_causal_only_mechanism_is_a_config_error(mechanism, tmp_path):
    msg = trainer_error(f"{IFORMER}:tiny", f"model.attention={mechanism}", tmp_path=tmp_path)
    assert f"model.attention={mechanism!r}" in msg and "causal only" in msg
    assert "allowed: " in msg and "softmax" in msg.split("allowed: ")[1]


def test_bad_vision_fields_are_config_errors(tmp_path):
    assert "patch_size" in trainer_error(f"{VIT}:tiny", "model.patch_size=5", tmp_path=tmp_path)
    assert "probe_queries" in trainer_error(f"{VIT}:probe_ep", "model.probe_queries=5",
                                            "init_from=", "init_from_config=", tmp_path=tmp_path)
    assert "attention_heads" in trainer_error(f"{IFORMER}:tiny", "model.attention_heads=(1,2,4)",
                                              tmp_path=tmp_path)


@pytest.mark.parametrize("pool", ("mean", "cls"))
def test_sincos2d_position_embeddings(pool):
    """model.posemb_init="sincos2d": the learned position embeddings start from the 2-D sin-cos
    table (numpy, MAE's layout [sin x, cos x, sin y, cos y], row-major patches); the CLS
    row keeps its random start; d_model not a multiple of 4 is refused by name."""
    g, d = 3, 8
    cfg = model_cfg(d_model=d, num_heads=2, num_kv_heads=2, patch_size=4, pool=pool,
                    posemb_init="sincos2d")
    table = np.asarray(vit.ViT(cfg, 4 * g, rngs=nnx.Rngs(0)).pos_embed[...])
    omega = 1.0 / 10_000 ** (np.arange(d // 4) / (d // 4))
    want = []
    for r in range(g):
        for col in range(g):
            want.append(np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                        np.sin(r * omega), np.cos(r * omega)]))
    np.testing.assert_allclose(table[-g * g:], np.array(want), rtol=1e-6, atol=1e-6)
    assert table.shape[0] == g * g + (pool == "cls")
    if pool == "cls":
        assert np.abs(table[0]).max() < 0.2  # normal(0.02), not a table row
    normal = np.asarray(vit.ViT(model_cfg(d_model=d, num_heads=2, num_kv_heads=2, patch_size=4,
                                          pool=pool), 4 * g, rngs=nnx.Rngs(0)).pos_embed[...])
    assert np.abs(normal).max() < 0.2


def test_sincos2d_needs_d_model_divisible_by_4(tmp_path):
    msg = trainer_error(f"{VIT}:tiny", "model.posemb_init=sincos2d", "model.d_model=66",
                        "model.num_heads=3", "model.num_kv_heads=3", tmp_path=tmp_path)
    assert "posemb_init='sincos2d'" in msg and "d_model=66" in msg
    assert "posemb_init" in trainer_error(f"{VIT}:tiny", "model.posemb_init=learned",
                                          tmp_path=tmp_path)
