"""ACT (attention/act.py): the calibrated map stays a causal attention map, beta = 1 and unchosen
heads are SoftmaxAttention exactly, a hand-computed sink example, and the greedy head search."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention

from attention import act
from models.lm import act_search
from attention.softmax import SoftmaxAttention
from conftest import TINY, jit_apply, make_tiny_config
from models.lm import LM


def _sinky_qkv(key, B=2, T=24, H=4, Hkv=2, d=16):
    """q, k, v whose token 0 (and 5) attract most attention: obvious sink columns."""
    kq, kk, kv = jax.random.split(key, 3)
    u = jnp.ones((d,)) / d ** 0.5
    q = jax.random.normal(kq, (B, T, H, d)) * 0.3 + 3.0 * u
    k = jax.random.normal(kk, (B, T, Hkv, d)) * 0.3
    k = k.at[:, 0].add(4.0 * u).at[:, 5].add(2.0 * u)
    v = jax.random.normal(kv, (B, T, Hkv, d))
    return q, k, v


def test_calibrated_rows_stay_stochastic_and_causal():
    q, k, _ = _sinky_qkv(jax.random.key(0))
    a = act.causal_attention_map(q, k)
    assert bool(act.sink_columns(a, 0.1)[..., 0].all())  # token 0 is a sink everywhere
    out = np.asarray(act.calibrate(a, alpha=0.1, beta=0.4))
    T = out.shape[-1]
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    assert out.min() >= 0.0
    assert np.all(out[..., ~np.tril(np.ones((T, T), bool))] == 0.0)  # causal zeros stay zeros
    assert np.abs(out - np.asarray(a)).max() > 1e-2  # and it did change the map


def test_sink_column_hand_computed():
    a = jnp.array([[1.0, 0.0, 0.0, 0.0],
                   [0.8, 0.2, 0.0, 0.0],
                   [0.6, 0.2, 0.2, 0.0],
                   [0.5, 0.1, 0.2, 0.2]])
    # column means sum_i A_ij / (N - j): 2.9/4 = 0.725, 0.5/3, 0.4/2, 0.2/1
    np.testing.assert_array_equal(act.sink_columns(a, 0.3), [True, False, False, False])
    np.testing.assert_array_equal(act.sink_columns(a, 0.18), [True, False, True, True])
    # alpha 0.3: column 0 scaled by 0.4, the removed 0.6 * A_i0 spread over the row's others in
    # proportion; row 0 has no other token and stays
    expected = np.array([[1.0, 0.0, 0.0, 0.0],
                         [0.32, 0.68, 0.0, 0.0],
                         [0.24, 0.38, 0.38, 0.0],
                         [0.20, 0.16, 0.32, 0.32]])
    np.testing.assert_allclose(act.calibrate(a, alpha=0.3, beta=0.4), expected, atol=1e-6)


def _act_layer(heads, beta=0.4, num_kv_heads=2):
    cfg = make_tiny_config("model.attention=act", f"model.num_kv_heads={num_kv_heads}",
                           f"model.act_beta={beta}", "model.act_heads=" + ",".join(heads)).model
    with nnx.use_eager_sharding(False):  # as models/lm/model.py builds its layers
        return (attention.build("act", cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), layer=0),
                SoftmaxAttention(cfg, rngs=nnx.Rngs(0)))


def test_beta_one_is_identity_and_unchosen_heads_untouched():
    q, k, v = _sinky_qkv(jax.random.key(1))
    ident, soft = _act_layer(("0:0", "0:1", "0:2", "0:3"), beta=1.0)
    ref = np.asarray(soft.attend(q, k, v, mode="train"))
    np.testing.assert_allclose(ident.attend(q, k, v, mode="train"), ref, atol=1e-5)
    a = act.causal_attention_map(q, k)
    np.testing.assert_array_equal(act.calibrate(a, alpha=0.1, beta=1.0), a)

    two, _ = _act_layer(("0:1", "0:2"))
    out = np.asarray(two.attend(q, k, v, mode="train"))
    np.testing.assert_array_equal(out[:, :, [0, 3]], ref[:, :, [0, 3]])  # bit for bit
    assert np.abs(out[:, :, [1, 2]] - ref[:, :, [1, 2]]).max() > 1e-3
    # the chosen heads equal the formula: calibrated map times V (head h reads kv head h // 2)
    cal = act.calibrate(act.causal_attention_map(q, k), alpha=0.1, beta=0.4)
    vv = jnp.repeat(v, 2, axis=2)
    want = jnp.einsum("bhqk,bkhd->bqhd", cal, vv)
    np.testing.assert_allclose(out[:, :, [1, 2]], want[:, :, [1, 2]], atol=1e-5)


def test_lm_loads_softmax_params_modes_and_config_round_trip():
    """An ACT LM holds the softmax LM's parameters unchanged; per-layer heads come from
    "layer:head" strings (which survive to_json); prefill calibrates like train, decode runs."""
    from trainer.config import from_json, to_json

    cfg = make_tiny_config("model.num_layers=2", "model.attention=act", "model.act_alpha=0.05",
                           "model.act_heads=0:1,1:3")
    again = from_json(to_json(cfg)).model
    assert act.parse_heads(again.act_heads) == ((0, 1), (1, 3))
    soft = LM(make_tiny_config("model.num_layers=2").model, rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(1)))  # as the Trainer does
    lm = LM(cfg.model, rngs=nnx.Rngs(1))  # ... building the same config again
    nnx.update(lm, nnx.state(soft, nnx.Param))
    for m in (abstract, lm):  # each layer knows its index (hence its heads)
        assert [(b.attn.layer, b.attn.heads) for b in m.blocks] == [(0, (1,)), (1, (3,))]
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 256, jnp.int32)

    def run(m, t):
        return m(t)[0], m(t, cache=m.init_cache(2, 28), mode="prefill")[0]

    base, _ = jit_apply(soft, run, tokens)
    train, pre = jit_apply(lm, run, tokens)
    np.testing.assert_allclose(pre, train, atol=1e-4)
    assert float(jnp.abs(train - base).max()) > 1e-4  # the calibration is on
    from models.lm import generate
    assert generate(lm, tokens, 3).shape == (2, 3)  # decode: plain attention over the cache
    with pytest.raises(ValueError, match="act_heads"):
        LM(make_tiny_config("model.attention=act", "model.act_heads=0:9").model, rngs=nnx.Rngs(0))


def test_search_returns_subset_and_does_not_raise_the_loss():
    cfg = make_tiny_config("model.num_layers=2", "model.attention=act", "model.act_alpha=0.05").model
    soft = LM(make_tiny_config("model.num_layers=2").model, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 256, (4, 33), dtype=np.int32)} for _ in range(2)]
    found = act_search.search_heads(soft, batches, model_config=cfg)
    every = {f"{l}:{h}" for l in range(2) for h in range(4)}
    assert set(found["heads"]) <= every and found["tried"] == 8
    assert found["loss_after"] <= found["loss_before"]
    assert found["heads"] and found["loss_after"] < found["loss_before"]  # sinks at alpha 0.05
    lm = act_search.as_act_model(soft, cfg)
    np.testing.assert_allclose(act_search.search_eval(lm, batches, ()), found["loss_before"], rtol=1e-5)
    np.testing.assert_allclose(act_search.search_eval(lm, batches, found["heads"]), found["loss_after"],
                               rtol=1e-5)


@pytest.mark.slow  # end to end: a run, the CLI, the Trainer
def test_cli_reports_heads_and_losses(tmp_path, capsys):
    from trainer import Trainer

    src = tmp_path / "run"  # a run's checkpoint (step 0: the mechanics need no training)
    with Trainer(make_tiny_config(), str(src), quiet=True) as t:
        t.save()
    assert act_search.main([f"--config={TINY}", f"--from={src}", "--batches=1"]) == 0
    out = capsys.readouterr().out
    assert "heads:" in out and "calibration loss:" in out and "eval loss" in out
    assert "--config.model.act_heads=" in out
    assert act_search.main([f"--config={TINY}", f"--from={tmp_path / 'none'}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
