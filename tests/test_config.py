"""Bad configs fail early (before anything compiles) with a ConfigError naming the field."""
from __future__ import annotations

import os

import pytest

from conftest import TINY
from trainer import ConfigError, Trainer, load_config


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if the train step would be compiled: config errors must come first."""
    def refuse(self, batch):
        raise AssertionError("the train step was compiled before the ConfigError was raised")

    monkeypatch.setattr(Trainer, "_compile_train_step", refuse)


def assert_config_error(config, workdir, *fragments: str) -> str:
    """Trainer(config, workdir).fit() raises ConfigError (in the constructor or before
    compiling) whose message contains every fragment; returns the message."""
    with pytest.raises(ConfigError) as e:
        with Trainer(config, str(workdir), quiet=True) as t:
            t.fit()
    message = str(e.value)
    for f in fragments:
        assert f in message, f"{f!r} not in ConfigError message: {message}"
    return message


# ----------------------------------------------------------------------------- overrides
def test_valid_overrides_are_parsed_to_the_field_type(tiny_config):
    c = tiny_config("train.steps=7", "train.lr=0.5", "train.remat=true", "data.paths=/a,/b",
                    "mesh.data=-1", "train.compute_dtype=bfloat16")
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.train.lr == 0.5 and isinstance(c.train.lr, float)
    assert c.train.remat is True
    assert tuple(c.data.paths) == ("/a", "/b")
    assert c.mesh.data == -1
    assert c.train.compute_dtype == "bfloat16"


def test_unknown_key_lists_valid_fields():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.stesp=3"])
    message = str(e.value)
    assert "stesp" in message
    for valid in ("train.steps", "train.global_batch_size", "mesh.data", "model.num_heads"):
        assert valid in message


def test_unknown_group_lists_valid_fields():
    with pytest.raises(ConfigError, match="trian") as e:
        load_config(TINY, ["trian.steps=3"])
    assert "train.steps" in str(e.value)


@pytest.mark.parametrize("override,field,expected", [
    ("train.steps=abc", "train.steps", "int"),
    ("train.lr=fast", "train.lr", "float"),
    ("train.remat=maybe", "train.remat", "bool"),
])
def test_wrong_type_names_field(override, field, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert field in str(e.value) and expected in str(e.value)


def test_override_without_value_is_rejected():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(TINY, ["train.steps"])


def test_setting_a_group_is_rejected():
    with pytest.raises(ConfigError, match="train"):
        load_config(TINY, ["train=3"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no_such_config.py"):
        load_config("configs/no_such_config.py:tiny")


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        load_config(TINY.rsplit(":", 1)[0] + ":huge")
    assert "huge" in str(e.value) and "tiny" in str(e.value)


# ----------------------------------------------------------------------------- values
BAD_CONFIGS = [
    (("train.nan_policy=ignore",), ("train.nan_policy", "'skip'", "'stop'")),
    (("train.compute_dtype=float16",), ("train.compute_dtype", "'bfloat16'")),
    (("train.steps=-1",), ("train.steps",)),
    (("train.grad_accum_steps=3",), ("train.global_batch_size", "grad_accum_steps=3")),
    (("mesh.data=3",), ("mesh", "8")),
    (("mesh.data=-1", "mesh.fsdp=-1"), ("mesh",)),
    (("mesh.data=8", "train.global_batch_size=4"), ("train.global_batch_size=4", "mesh.data")),
    (("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.global_batch_size=8",
      "train.grad_accum_steps=4"), ("train.global_batch_size", "grad_accum_steps=4")),
    (("mesh.data=-1", "mesh.tensor=8"), ("model.num_heads",)),
    (("model.num_kv_heads=3",), ("model.num_kv_heads",)),
    (("model.attention=no_such_attention",), ("model.attention", "no_such_attention", "softmax")),
    (("data.paths=/nonexistent/corpus",), ("data.paths", "/nonexistent/corpus")),
    (("init_from=/nonexistent/run",), ("init_from",)),
    (("init_from_carry=everything",), ("init_from_carry", "'params+optimizer+step'")),
    (("train.schedule_steps=-1",), ("train.schedule_steps",)),
    (("model.attention=act", "model.act_beta=1.5"), ("model.act_beta", "[0, 1]")),
    (("model.attention=hip", "model.sparse_impl=fast"), ("model.sparse_impl", "'fast'", "pallas")),
    # the embedding dimension 36 is not divisible by mesh.fsdp=8 (head_dim is set explicitly,
    # so the head checks pass): the parameters cannot be sharded
    (("model.d_model=36", "model.head_dim=16", "mesh.data=1", "mesh.fsdp=8"),
     ("config.mesh", "embed")),
]


@pytest.mark.parametrize("overrides,fragments", BAD_CONFIGS,
                         ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_raises_before_compiling(tiny_config, tmp_path, no_compile, overrides, fragments):
    assert_config_error(tiny_config(*overrides), tmp_path, *fragments)


def test_empty_data_directory(tiny_config, tmp_path, no_compile):
    empty = tmp_path / "corpus"
    empty.mkdir()
    assert_config_error(tiny_config(f"data.paths={empty}"), tmp_path / "run", "data.paths",
                        str(empty))


def test_eval_split_too_small_fails_before_compiling(tiny_config, tmp_path, no_compile):
    """A corpus whose eval split holds less than one batch must fail before training, not
    after all the steps have run."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # 1 file: the eval split is its last 10% = 60 bytes, < one window of seq_len + 1 = 33 bytes
    # times the micro-batch of 8; the train split (540 bytes) holds 16 windows
    (corpus / "a.txt").write_bytes(bytes(range(32, 122)) * 6 + b"\n" * 60)
    assert_config_error(tiny_config(f"data.paths={corpus}"), tmp_path / "run", "eval")


# ----------------------------------------------------------------------------- the pipeline
def test_the_pipeline_checks_every_stage_up_front_and_the_trainer_never_sees_stages(
        tiny_config, tmp_path):
    from trainer.stages import runs

    staged = tiny_config("stages=({'train.steps': 2}, {'train.stepz': 3})")
    with pytest.raises(ConfigError, match=r"config.stages\[1\].*train.stepz.*train.steps"):
        runs(staged, str(tmp_path))
    ok = tiny_config("stages=({'train.steps': 2}, {'model.attention': 'moh', 'train.steps': 3})")
    (c1, d1), (c2, d2) = runs(ok, str(tmp_path))
    assert not c1.stages and not c2.stages and d1.endswith("stage_1") and c2.init_from == d1
    assert c2.model.moh_top_k == 2  # a stage's new mechanism brings its options
    assert_config_error(ok, tmp_path, "config.stages", "fit_stages")  # not a Trainer's input
    trainer_py = open(os.path.join(os.path.dirname(__file__), "..", "trainer", "trainer.py")).read()
    assert "stages" not in trainer_py


def test_mechanism_options_are_checked_once_before_anything_is_built(tiny_config, monkeypatch):
    """trainer.cli.check reports a bad mechanism option without building a model (the same
    check a directly built layer runs), and the CLI prints it without a traceback."""
    from trainer import cli

    with pytest.raises(ConfigError, match=r"model.landmark_decode='sparse': allowed: 'dense', 'topk'"):
        cli.check(tiny_config("model.attention=landmark", "model.landmark_decode=sparse"))
    from trainer.main import main
    code = main(["--config=" + TINY, "--config.model.attention=ssa",
                 "--config.model.ssa_keep_ratio=0", "--dry_run"])
    assert code == 2
