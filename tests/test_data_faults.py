"""Bad data never kills a run with a traceback (issue 25, item 4): files that cannot be read are
found up front (a header pass before the first step, all of them reported at once with a count)
or, with data.skip_bad=True, left out / replaced with a warning naming each; one that fails only
when decoded mid-run stops the run after a checkpoint, naming the file; the tools say the same."""
from __future__ import annotations

import os

import grain
import numpy as np
import pytest

from conftest import TEST_OVERRIDES, TINY, steps_on_disk
from trainer.config import ConfigError
from trainer.data import BadExample, SkipBad, check_files


def _corrupt(folder, n_empty=1, n_garbage=1, n_truncated=1):
    """Damage files of an image folder: empty, not an image, and truncated after the header
    (passes the header pass, fails to decode). Returns the three lists of paths."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.endswith(".png"))
    empty, garbage, truncated = (files[:n_empty], files[n_empty:n_empty + n_garbage],
                                 files[n_empty + n_garbage:n_empty + n_garbage + n_truncated])
    for p in empty:
        open(p, "wb").close()
    for p in garbage:
        open(p, "wb").write(b"this is not an image")
    for p in truncated:
        data = open(p, "rb").read()
        open(p, "wb").write(data[:len(data) // 3])
    return empty, garbage, truncated


# ----------------------------------------------------------------------------- the pieces
def test_check_files_reports_every_bad_file_at_once(tmp_path):
    from models.images import image_header, write_image_folder

    root = write_image_folder(str(tmp_path), num_per_class=3, image_size=16)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    empty, garbage, truncated = _corrupt(root)
    with pytest.raises(ConfigError) as e:
        check_files(files, image_header, what="test images", skip_bad=False)
    msg = str(e.value)
    assert f"2 of the {len(files)} test images cannot be read" in msg
    assert empty[0] in msg and "an empty file" in msg and garbage[0] in msg
    assert truncated[0] not in msg  # its header is fine: the decode finds it
    assert "data.skip_bad=True" in msg
    with pytest.warns(UserWarning, match="2 of the .* left out") as record:
        keep = check_files(files, image_header, what="test images", skip_bad=True)
    assert len(record) == 1 and empty[0] in str(record[0].message)
    assert [files[k] for k in keep] == [f for f in files if f not in empty + garbage]


class _Flaky:
    """Examples 0..n-1; those in `bad` raise BadExample naming a file."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if int(i) in self.bad:
            raise BadExample(f"/data/{i}.png", f"cannot decode image file '/data/{i}.png'")
        return {"x": np.int32(i)}


def test_bad_examples_cross_process_boundaries():
    """A Grain worker process pickles the error to the trainer: path and message survive."""
    import pickle

    from models.ast.audio import AudioDataError

    for cls in (BadExample, AudioDataError):
        e = pickle.loads(pickle.dumps(cls("/d/x.wav", "cannot read '/d/x.wav'")))
        assert type(e) is cls and e.path == "/d/x.wav" and str(e) == "cannot read '/d/x.wav'"


def test_skip_bad_replaces_an_example_by_the_next_readable_one():
    ds = SkipBad(grain.MapDataset.source(_Flaky(6, bad={2, 3, 5})), skip=True)
    with pytest.warns(UserWarning, match="skipping an unreadable example") as record:
        got = [int(ds[i]["x"]) for i in range(6)]
        again = [int(x["x"]) for x in ds._getitems(range(6))]  # the batched read agrees
    assert got == again == [0, 1, 4, 4, 4, 0]  # the next readable, wrapping a finite parent
    assert sorted(ds.skipped) == ["/data/2.png", "/data/3.png", "/data/5.png"]
    assert len(record) == 3  # each file named once
    strict = SkipBad(grain.MapDataset.source(_Flaky(6, bad={2})), skip=False)
    with pytest.raises(BadExample, match="2.png"):
        strict[2]
    hopeless = SkipBad(grain.MapDataset.source(_Flaky(100, bad=range(100))), skip=True)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="consecutive examples"):
        hopeless[0]


# ----------------------------------------------------------------------------- the families
def test_image_folder_up_front_and_mid_run(tmp_path):
    from models.images import image_folder, write_image_folder

    root = write_image_folder(str(tmp_path), num_per_class=6, image_size=16)
    empty, garbage, truncated = _corrupt(root)
    with pytest.raises(ConfigError, match="cannot be read") as e:
        for split in ("train", "eval"):
            image_folder(root, split, image_size=16)
    assert empty[0] in str(e.value) or garbage[0] in str(e.value)
    with pytest.warns(UserWarning, match="left out"):
        train, _ = image_folder(root, "train", image_size=16, skip_bad=True)
        evals, _ = image_folder(root, "eval", image_size=16, skip_bad=True)
    hit = None  # the truncated file's header passed: its decode fails when read
    for ds, n in ((evals, len(evals)), (train, 200)):
        try:
            for i in range(n):
                ds[i]
        except BadExample as e:
            hit = e
            break
    assert hit is not None and hit.path == truncated[0] and truncated[0] in str(hit)


def test_coco_images_are_checked_against_their_annotations(tmp_path):
    from models.detr import coco

    written = coco.write_shapes_coco(str(tmp_path), num_train=6, num_eval=2, image_size=32)
    images = sorted(os.listdir(written["train_images"]))
    bad = os.path.join(written["train_images"], images[1])
    open(bad, "wb").write(b"")
    kw = dict(image_size=32, max_objects=4)
    with pytest.raises(ConfigError, match=r"1 of the 6 images .* cannot be read") as e:
        coco.coco_detection(written["train_annotations"], written["train_images"], "train", **kw)
    assert bad in str(e.value)
    with pytest.warns(UserWarning, match="left out"):
        ds = coco.coco_detection(written["train_annotations"], written["train_images"], "eval",
                                 skip_bad=True, **kw)
    assert len(ds) == 5


def test_audio_stats_names_a_bad_wav_and_skips_it_when_asked(tmp_path, capsys):
    from models.ast import audio

    root = audio.write_synthetic_esc50(str(tmp_path), num_per_class_per_fold=1)
    wavs = sorted(os.listdir(os.path.join(root, "audio")))
    bad = os.path.join(root, "audio", wavs[0])
    open(bad, "wb").write(b"RIFX garbage")
    args = ["stats", f"--source={root}", "--num_mel_bins=32", "--target_length=16"]
    assert audio.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and bad in err and "--skip_bad" in err
    assert "Traceback" not in err
    with pytest.warns(UserWarning, match="skipped 1 unreadable audio file"):
        assert audio.main(args + ["--skip_bad"]) == 0
    assert "clips=" in capsys.readouterr().out


def test_an_empty_text_file_names_itself_and_data_paths(tmp_path, capsys):
    from trainer.main import main

    empty = tmp_path / "corpus.txt"
    empty.write_text("")
    assert main([f"--config={TINY}", f"--workdir={tmp_path / 'w'}", "--dry_run",
                 f"--config.data.paths={empty}"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "config.data.paths" in err and "empty" in err


# ----------------------------------------------------------------------------- the trainer
def _flaky_lm(monkeypatch, bad_from: int):
    """The tiny LM's train data raising BadExample from example `bad_from` on (every 7th)."""
    from models.lm.model import LMTask

    real = LMTask.train_data

    class Flaky(grain.MapDataset):
        def __init__(self, parent):
            super().__init__(parent)

        def __len__(self):
            return len(self._parent)

        def __getitem__(self, i):
            if isinstance(i, slice):
                return self.slice(i)
            if i >= bad_from and i % 7 == 0:
                raise BadExample(f"/corpus/{i}.txt", f"cannot read '/corpus/{i}.txt'")
            return self._parent[i]

    monkeypatch.setattr(LMTask, "train_data", lambda self: Flaky(real(self)))


def test_a_file_failing_mid_run_stops_after_a_checkpoint_naming_it(tmp_path, capsys, monkeypatch):
    from trainer.main import main

    _flaky_lm(monkeypatch, bad_from=3 * 8)  # batches of 8: step 4's batch holds example 28
    args = [f"--config={TINY}", f"--workdir={tmp_path}",
            *[f"--config.{o}" for o in TEST_OVERRIDES], "--config.train.steps=6",
            "--config.train.global_batch_size=8", "--config.checkpoint.every=0",
            "--config.eval.every=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "/corpus/28.txt" in err and "stopped at step 3" in err and "data.skip_bad" in err
    assert "Traceback" not in err
    assert steps_on_disk(tmp_path) == [3]  # the steps trained before it are kept
    with pytest.warns(UserWarning, match="skipping an unreadable example"):
        assert main(args + ["--config.data.skip_bad=true"]) == 0  # resumes, replaces it
    assert steps_on_disk(tmp_path)[-1] == 6


# ----------------------------------------------------------------------------- input workers
def test_input_workers_read_the_same_batches_and_resume_exactly(tmp_path):
    """data.num_workers=2 (Grain worker processes): the same example ids in the same order as
    in-process reading, and a run stopped at step 2 resumes at the next example."""
    from conftest import make_tiny_config, run_trainer

    base = ("train.steps=4", "train.global_batch_size=8", "checkpoint.every=2")
    plain = run_trainer(make_tiny_config(*base), tmp_path / "plain")
    workers = make_tiny_config(*base, "data.num_workers=2")
    first = run_trainer(workers, tmp_path / "workers", max_steps=2)
    rest = run_trainer(workers, tmp_path / "workers")
    ids = np.concatenate(first.ids + rest.ids)
    np.testing.assert_array_equal(ids, np.concatenate(plain.ids))
    assert rest.result["step"] == 4
    np.testing.assert_allclose(rest.losses[4], plain.losses[4], rtol=1e-6)


def test_got10k_empty_frames_are_found_up_front(tmp_path):
    from models.mixformer.tracking import load_got10k, write_shapes_got10k

    root = str(tmp_path / "got")
    write_shapes_got10k(root, num_sequences=3, num_frames=6, image_size=32)
    seqs = load_got10k(root, "val")
    empty = seqs[1].frames[2]
    open(empty, "wb").close()
    with pytest.raises(ConfigError, match=r"(?s)1 of the 18 frames .* cannot be read.*an empty"):
        load_got10k(root, "val")
    with pytest.warns(UserWarning, match="left out"):
        kept = load_got10k(root, "val", skip_bad=True)
    assert [s.name for s in kept] == [seqs[0].name, seqs[2].name]
