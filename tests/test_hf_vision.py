"""Hugging Face ViT and AST checkpoints in and out (issue 26): the tiny goldens of tests/goldens
(ViTForImageClassification, ViTModel with its pooler, ASTForAudioClassification; written by
make_hf_goldens.py with transformers, which the suite does not need) imported with `python -m
trainer.convert import-hf`, compared with transformers' outputs on the same input tensors,
exported back bit for bit; then used as the frozen backbone of a ViT probe and an AST PETL run
(`init_from`)."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, param_arrays
from trainer.config import ConfigError

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")
NAMES = ("vit_tiny", "vit_model_tiny", "ast_tiny")
VIT = os.path.join(REPO_ROOT, "configs", "vit.py")
AST = os.path.join(REPO_ROOT, "configs", "ast.py")
RUN = ("train.warmup_steps=0", "train.log_every=1", "eval.every=0", "eval.batches=1",
       "checkpoint.every=0", "checkpoint.async_save=false", "train.global_batch_size=8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{golden: its imported run directory}."""
    from trainer.convert import main

    root = tmp_path_factory.mktemp("hf_vision")
    for name in NAMES:
        assert main(["import-hf", os.path.join(GOLDENS, name), str(root / name)]) == 0
    return {name: str(root / name) for name in NAMES}


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_imported_vit_gives_transformers_logits(runs):
    from trainer.api import load_checkpoint

    golden = np.load(os.path.join(GOLDENS, "vit_tiny.npz"))
    model, config = load_checkpoint(runs["vit_tiny"])
    m = config.model
    assert (m.d_model, m.num_heads, m.mlp_dim, m.patch_size, m.num_classes) == (36, 6, 52, 4, 5)
    assert m.pool == "cls" and m.softmax_bias and m.norm_eps == 1e-12
    assert config.data.image_size == 20
    # transformers' pixel_values are NCHW, the family's images NHWC: the same tensor
    logits = model(jnp.asarray(golden["pixel_values"].transpose(0, 2, 3, 1)))
    assert relative_error(logits, golden["logits"]) < 1e-4


def test_imported_vit_model_gives_the_last_hidden_state(runs):
    """ViTModel: the backbone's CLS token and patch tokens are transformers' last_hidden_state;
    the pooler is ignored, the classifier (none there) keeps its initial zeros."""
    from trainer.api import load_checkpoint

    golden = np.load(os.path.join(GOLDENS, "vit_model_tiny.npz"))
    model, config = load_checkpoint(runs["vit_model_tiny"])
    assert config.model.norm_eps == 1e-6 and config.model.num_classes == 2
    tokens, cls = model.backbone(jnp.asarray(golden["pixel_values"].transpose(0, 2, 3, 1)))
    hidden = np.concatenate([np.asarray(cls)[:, None], np.asarray(tokens)], axis=1)
    assert relative_error(hidden, golden["last_hidden_state"]) < 1e-4
    assert not np.asarray(model.classifier.kernel[...]).any()


def test_imported_ast_gives_transformers_logits(runs):
    from trainer.api import load_checkpoint

    golden = np.load(os.path.join(GOLDENS, "ast_tiny.npz"))
    model, config = load_checkpoint(runs["ast_tiny"])
    m, d = config.model, config.data
    assert (m.patch_size, m.fstride, m.tstride) == (4, 3, 2)
    assert (d.num_mel_bins, d.target_length) == (16, 24)
    assert m.pool == "cls_dist" and m.classifier_norm and m.num_classes == 3
    assert model.backbone.grid == (5, 11)  # frequency rows, time columns
    # input_values [B, T, F]: the normalised fbank the family's model takes
    logits = model(jnp.asarray(golden["input_values"]))
    assert relative_error(logits, golden["logits"]) < 1e-4


@pytest.mark.parametrize("name,architecture", [("vit_tiny", None), ("vit_model_tiny", "ViTModel"),
                                               ("ast_tiny", None)])
def test_import_then_export_round_trips_bit_exactly(runs, name, architecture, tmp_path):
    from trainer.convert import main
    from trainer.hf import SafeTensors

    out = tmp_path / "exported"
    assert main(["export-hf", runs[name], str(out)]
                + ([f"--architecture={architecture}"] if architecture else [])) == 0
    ours = SafeTensors(str(out / "model.safetensors"))
    theirs = SafeTensors(os.path.join(GOLDENS, name, "model.safetensors"))
    # a ViTModel export has no pooler (transformers then builds one afresh, or none with
    # add_pooling_layer=False); everything else is written back as it came
    pooler = {n for n in theirs.names() if n.startswith("pooler.")}
    assert sorted(ours.names()) == sorted(set(theirs.names()) - pooler)
    assert bool(pooler) == (name == "vit_model_tiny")
    for n in ours.names():
        np.testing.assert_array_equal(ours[n], theirs[n], err_msg=n)
    exported = json.loads((out / "config.json").read_text())
    original = json.loads(open(os.path.join(GOLDENS, name, "config.json")).read())
    keys = ["architectures", "model_type", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
            "qkv_bias", "patch_size"]
    keys += (["frequency_stride", "time_stride", "max_length", "num_mel_bins", "id2label"]
             if name == "ast_tiny" else ["image_size", "num_channels"])
    keys += ["id2label"] if name == "vit_tiny" else []
    for key in keys:
        assert exported[key] == original[key], key


def test_export_names_what_the_architecture_cannot_hold(runs, tmp_path, capsys):
    from models import vit_hf
    from models.ast import hf as ast_hf
    from trainer.cli import load_config
    from trainer.convert import main

    with pytest.raises(ConfigError, match=r"pool='mean' \(ViTForImageClassification: 'cls'.*"):
        vit_hf.VIT_CLASSIFIER.hf_config(load_config(f"{VIT}:tiny"))
    with pytest.raises(ConfigError, match=r"softmax_bias=False \(ViTModel: True\)"):
        vit_hf.VIT_MODEL.hf_config(load_config(f"{VIT}:tiny", ["model.pool=cls"]))
    with pytest.raises(ConfigError, match=r"probe='ep' \(ViTForImageClassification: ''"):
        vit_hf.VIT_CLASSIFIER.hf_config(load_config(f"{VIT}:probe_ep", [
            "model.pool=cls", "model.softmax_bias=True"]))
    adapter = load_config(f"{AST}:adapter", ["model.pool=cls_dist", "model.classifier_norm=True",
                                             "model.softmax_bias=True"])
    with pytest.raises(ConfigError, match=r"petl='adapter' \(ASTForAudioClassification has no "
                                          r"place for its adapter parameters"):
        ast_hf.AST.hf_config(adapter)
    with pytest.raises(ConfigError, match=r"classifier_norm=False"):
        ast_hf.AST.hf_config(load_config(f"{AST}:tiny", ["model.pool=cls_dist",
                                                         "model.softmax_bias=True"]))
    assert main(["export-hf", runs["ast_tiny"], str(tmp_path / "x"),
                 "--architecture=ViTModel"]) == 2
    assert "a 'ast' run is written as ASTForAudioClassification" in capsys.readouterr().err


def _broken(tmp_path, name, config):
    root = tmp_path / name
    shutil.copytree(os.path.join(GOLDENS, name), root)
    c = json.loads((root / "config.json").read_text())
    c.update(config)
    (root / "config.json").write_text(json.dumps(c))
    return str(root)


def test_bad_checkpoints_are_named(tmp_path):
    from trainer.convert import import_hf

    def refused(name, config, match):
        with pytest.raises(ConfigError, match=match):
            import_hf(_broken(tmp_path / str(len(os.listdir(tmp_path))), name, config),
                      str(tmp_path / "run"))

    refused("vit_tiny", {"hidden_act": "gelu_new"},
            r"config.json hidden_act='gelu_new' is not supported for ViTForImageClassification; "
            r"supported: 'gelu'")
    refused("vit_tiny", {"qkv_bias": False}, r"qkv_bias=False is not supported.*supported: True")
    refused("vit_model_tiny", {"num_channels": 1}, r"num_channels=1 is not supported")
    refused("ast_tiny", {"hidden_act": "relu"}, r"hidden_act='relu' is not supported for "
                                                r"ASTForAudioClassification")
    # a config that builds other shapes than the file holds: the tensors are named, both shapes
    refused("vit_tiny", {"image_size": 24},
            r"backbone/pos_embed: tensor 'vit.embeddings.position_embeddings' has shape "
            r"\(1, 26, 36\), which maps to \(26, 36\); this model needs \(37, 36\)")

    def replaced(name, tensor, shape):  # the golden with one tensor of another shape
        from trainer.hf import SafeTensors, write_safetensors

        root = tmp_path / f"{name}_{shape}"
        shutil.copytree(os.path.join(GOLDENS, name), root)
        st = SafeTensors(str(root / "model.safetensors"))
        tensors = {n: np.array(st[n]) for n in st.names()}
        del st
        tensors[tensor] = np.zeros(shape, np.float32)
        write_safetensors(str(root / "model.safetensors"), tensors)
        return str(root)

    # the patch embedding's layout map cannot take it
    with pytest.raises(ConfigError, match=r"backbone/patch_embed/kernel: tensor 'vit.embeddings."
                                          r"patch_embeddings.projection.weight' has shape "
                                          r"\(36, 3, 5, 5\), which maps to nothing; this model "
                                          r"needs \(48, 36\)"):
        import_hf(replaced("vit_tiny", "vit.embeddings.patch_embeddings.projection.weight",
                           (36, 3, 5, 5)), str(tmp_path / "run"))
    # two HF tensors make one parameter here: both are named
    emb = "audio_spectrogram_transformer.embeddings."
    with pytest.raises(ConfigError, match=rf"backbone/cls: tensor '{emb}cls_token' \+ "
                                          rf"'{emb}distillation_token' has shape \(1, 1, 24\) "
                                          r"and \(1, 1, 20\), which maps to nothing; this model "
                                          r"needs \(1, 2, 24\)"):
        import_hf(replaced("ast_tiny", f"{emb}distillation_token", (1, 1, 20)),
                  str(tmp_path / "run"))


def _backbone_fields(config, fields) -> list[str]:
    return [f"model.{f}={config.model[f]}" for f in fields]


@pytest.mark.slow
def test_vit_probes_train_on_an_imported_backbone(runs, tmp_path):
    """Item 6: configs/vit.py:probe_linear and probe_ep with init_from = the imported ViT (its
    shapes set as overrides): the backbone is loaded and stays bit-identical, the probe learns.
    A probe config whose backbone would compute otherwise (no q/k/v/o biases) is refused."""
    from trainer import Trainer, load_config
    from trainer.api import load_checkpoint

    model, src = load_checkpoint(runs["vit_tiny"])
    source = param_arrays(model)
    shape = [*_backbone_fields(src, ("d_model", "num_layers", "num_heads", "num_kv_heads",
                                     "mlp_dim", "patch_size", "pool", "norm_eps")),
             f"data.image_size={src.data.image_size}", f"init_from={runs['vit_tiny']}",
             "train.steps=1", *RUN]
    for probe, extra in (("linear", []), ("ep", ["model.probe_queries=4"])):
        c = load_config(f"{VIT}:probe_{probe}", [*shape, "model.softmax_bias=True", *extra])
        with Trainer(c, str(tmp_path / probe), quiet=True) as t:
            before = param_arrays(t.model)
            if probe == "linear":  # (the EP probe trains alike: tests/test_vision.py)
                t.fit()
            after = param_arrays(t.model)
        backbone = [k for k in after if k.startswith("['backbone']")]
        assert set(backbone) == {k for k in source if k.startswith("['backbone']")}
        for k in backbone:
            np.testing.assert_array_equal(before[k], source[k], err_msg=k)  # loaded
            np.testing.assert_array_equal(after[k], source[k], err_msg=k)  # and frozen
        probe_keys = [k for k in after if k.startswith("['probe']")]
        assert probe_keys
        if probe == "linear":
            assert all(not np.array_equal(after[k], before[k]) for k in probe_keys)
    # (the probe configs take the backbone's fields from init_from: a contradicting override)
    c = load_config(f"{VIT}:probe_linear", [*shape, "model.softmax_bias=False"])
    with pytest.raises(ConfigError, match=r"softmax_bias=False, but the source has True"):
        with Trainer(c, str(tmp_path / "nobias"), quiet=True) as t:
            t.initial_state()


@pytest.mark.slow
def test_ast_petl_trains_on_an_imported_backbone(runs, tmp_path):
    """Item 6: configs/ast.py:lora with init_from = the imported AST (a frozen backbone for
    PETL) on shorter clips (20 frames, not 24) and another label set (4 classes, not 3): the
    backbone's parameters stay those of the checkpoint (the position embeddings cut to the
    shorter grid), LoRA and the new classifier learn; exported (LoRA merged into W_q, W_v) and
    imported back, it is a plain AST computing the same logits. The imported run's front-end
    fields (AudioSet's mean / std) must be the run's."""
    from models.ast import adapt_pos_embed, patch_grid
    from trainer import Trainer, load_config
    from trainer.api import load_checkpoint
    from trainer.convert import main

    _, src = load_checkpoint(runs["ast_tiny"])
    # the backbone's shapes and spectrogram statistics come from init_from (init_from_config)
    over = ["data.target_length=20", f"init_from={runs['ast_tiny']}", "train.steps=1",
            "data.synthetic_per_fold=2", f"data.embedded_dir={tmp_path / 'data'}", *RUN]
    # AST's own head (so that ASTForAudioClassification can hold the result)
    c = load_config(f"{AST}:lora", [*over, "model.classifier_norm=True"])
    for f in ("d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "patch_size",
              "fstride", "tstride", "norm_eps", "softmax_bias", "pool"):
        assert c.model[f] == src.model[f], f
    for f in ("num_mel_bins", "norm_mean", "norm_std"):
        assert c.data[f] == src.data[f], f
    assert (c.model.petl, c.model.lora_rank, c.data.target_length) == ("lora", 4, 20)
    assert c.init_from_skip == "^classifier" and c.train.trainable == "lora_|^classifier"
    with Trainer(c, str(tmp_path / "lora"), quiet=True) as t:
        before = param_arrays(t.model)
        t.fit()
        after = param_arrays(t.model)
    model, _ = load_checkpoint(runs["ast_tiny"])
    source = param_arrays(model)
    frozen = [k for k in after if k.startswith("['backbone']") and "lora_" not in k]
    assert len(frozen) == len([k for k in source if k.startswith("['backbone']")])
    f, t_cols = patch_grid(20, 16, c.model)
    assert (f, t_cols) == (5, 9)
    pos = next(k for k in source if "pos_embed" in k)
    source[pos] = np.asarray(adapt_pos_embed(source[pos], f, t_cols))
    for k in frozen:
        np.testing.assert_array_equal(after[k], source[k], err_msg=k)
    learned = [k for k in after if "lora_b" in k or k.startswith("['classifier']")]
    assert learned and all(not np.array_equal(after[k], before[k]) for k in learned)
    assert main(["export-hf", str(tmp_path / "lora"), str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    lora, _ = load_checkpoint(str(tmp_path / "lora"))
    plain, back = load_checkpoint(str(tmp_path / "back"))
    assert back.model.petl == "full" and (back.data.target_length, back.model.num_classes) == (
        20, 4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 20, 16)), jnp.float32)
    want = np.asarray(lora(x))
    assert relative_error(plain(x), want) < 1e-5
    # the spectrogram statistics of the checkpoint are part of its backbone
    c = load_config(f"{AST}:lora", [*over, "data.norm_mean=-2.33"])
    with pytest.raises(ConfigError, match=r"data.norm_mean=-2.33, but the source has "
                                          r"-4.2677393"):
        with Trainer(c, str(tmp_path / "stats"), quiet=True) as t:
            t.initial_state()
