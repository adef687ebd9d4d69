"""MixFormer end to end: the Task trains on the embedded GOT-10k-layout sequences (stage 1,
then stage 2 on the score head only, from the stage-1 checkpoint), and the online tracker
(models/mixformer/track.py) writes complete result files, metrics and a success plot."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import REPO_ROOT, run_trainer

CONFIG = os.path.join(REPO_ROOT, "configs", "mixformer.py")
# a one-layer model on 4 short sequences: seconds
SMALL = ("model.num_layers=1", "model.d_model=32", "model.mlp_dim=64", "model.corner_dim=16",
         "model.score_hidden=32", "data.num_sequences=4", "data.num_frames=12",
         "data.image_size=64")


def small(tmp_path, variant, *overrides):
    from trainer import load_config
    return load_config(f"{CONFIG}:{variant}", [
        "train.steps=3", "train.warmup_steps=0", "train.log_every=1", "eval.batches=1",
        "checkpoint.every=0", "train.global_batch_size=8", "data.samples_per_epoch=64",
        "data.eval_samples=16", f"data.embedded_dir={tmp_path / 'data'}", *SMALL, *overrides])


def test_stages_train_and_the_tracker_writes_results(tmp_path, capsys):
    from models.mixformer import tracking
    from models.mixformer.track import main

    stage1 = run_trainer(small(tmp_path, "tiny"), tmp_path / "stage1")
    assert all(np.isfinite(list(stage1.losses.values())))
    assert "score_auroc" not in stage1.result["eval"]  # stage 1 has no negatives to rank
    stage2 = run_trainer(small(tmp_path, "score", f"init_from={tmp_path / 'stage1'}"),
                         tmp_path / "stage2")
    for name, p in stage2.params.items():  # stage 2 trains the score head only
        changed = not np.array_equal(p, stage1.params[name])
        assert changed == name.startswith("['score']"), name
    assert 0.0 <= stage2.result["eval"]["score_auroc"] <= 1.0

    out = tmp_path / "results"
    assert main([f"--config={CONFIG}:score", f"--from={tmp_path / 'stage2'}", f"--out={out}",
                 "--limit=2", f"--config.data.embedded_dir={tmp_path / 'data'}",
                 *(f"--config.{o}" for o in SMALL)]) == 0
    text = capsys.readouterr().out
    assert "tracker: AUC" in text and "stay on the first box: AUC" in text
    results = sorted(f for f in os.listdir(out) if f.endswith(".txt"))
    assert len(results) == 2
    for f in results:
        assert len(open(out / f).read().splitlines()) == 12  # a line per frame
    assert (out / "success.png").stat().st_size > 0

    # a frame that cannot be read (issue 25, item 4): that sequence is named with the file, the
    # other sequences' results are written, the exit status says something failed
    val = tmp_path / "data" / "val"
    second = [x for x in open(val / "list.txt").read().split() if x][1]
    frame = sorted((val / second).glob("*.png"))[5]
    original = frame.read_bytes()
    frame.write_bytes(b"not a png")
    out2 = tmp_path / "results2"
    assert main([f"--config={CONFIG}:score", f"--from={tmp_path / 'stage2'}", f"--out={out2}",
                 "--limit=2", f"--config.data.embedded_dir={tmp_path / 'data'}",
                 *(f"--config.{o}" for o in SMALL)]) == 1
    captured = capsys.readouterr()
    assert f"sequence {second!r} not tracked" in captured.err and frame.name in captured.err
    assert "tracked 1 sequences" in captured.out and "tracker: AUC" in captured.out
    assert sorted(f for f in os.listdir(out2) if f.endswith(".txt")) == [results[0]]
    frame.write_bytes(original)

    # the GOT-10k test split (issue 29, item 3): first-frame boxes only -> no metrics, the
    # evaluation server's layout; a split mixing the two kinds of ground truth is refused
    test = tmp_path / "test"
    shutil.copytree(val, test)
    every = [x for x in open(test / "list.txt").read().split() if x]
    for name in every:
        gt = test / name / "groundtruth.txt"
        gt.write_text(gt.read_text().splitlines()[0] + "\n")
        (test / name / "absence.label").unlink()
    names = every[:2]
    args = [f"--config={CONFIG}:score", f"--from={tmp_path / 'stage2'}",
            f"--config.data.embedded_dir={tmp_path / 'data'}", *(f"--config.{o}" for o in SMALL)]
    out3 = tmp_path / "results3"
    assert main([*args, f"--sequences={test}", f"--out={out3}", "--limit=2"]) == 0
    text = capsys.readouterr().out
    assert "AUC" not in text and "test split" in text and "submission layout" in text
    assert sorted(os.listdir(out3)) == sorted(names)
    for name in names:
        frames = len(list((test / name).glob("*.png")))
        boxes = tracking.read_result(str(out3 / name / f"{name}_001.txt"))
        assert boxes.shape == (frames, 4)
        np.testing.assert_allclose(boxes[0], np.loadtxt(test / name / "groundtruth.txt",
                                                        delimiter=","), atol=1e-4)
        times = np.loadtxt(out3 / name / f"{name}_time.txt")
        assert times.shape == (frames,) and np.all(times > 0)
    # one sequence with its full ground truth back: a mixed folder, refused by name (whatever
    # --limit keeps), or with --skip_bad the first-box-only ones are skipped
    last = every[-1]
    shutil.copy(val / last / "groundtruth.txt", test / last / "groundtruth.txt")
    assert main([*args, f"--sequences={test}", f"--out={tmp_path / 'r4'}", "--limit=1"]) == 2
    assert (f"{len(every) - 1} of {len(every)} sequences have only a first-frame box"
            in capsys.readouterr().err)
    with pytest.warns(UserWarning, match="those are skipped"):
        assert main([*args, f"--sequences={test}", f"--out={tmp_path / 'r6'}",
                     "--skip_bad"]) == 0
    assert "tracker: AUC" in capsys.readouterr().out
    assert sorted(f for f in os.listdir(tmp_path / "r6") if f.endswith(".txt")) == [f"{last}.txt"]
    # --submission on a split with ground truth: metrics and both layouts
    assert main([*args, f"--out={tmp_path / 'r5'}", "--limit=1", "--submission"]) == 0
    assert "tracker: AUC" in capsys.readouterr().out
    first = names[0]
    assert (tmp_path / "r5" / f"{first}.txt").is_file()
    assert (tmp_path / "r5" / first / f"{first}_time.txt").is_file()


def test_auroc_equals_the_pairwise_definition():
    from models.mixformer import auroc

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=40), 1)  # ties on purpose
    labels = rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(scores, labels) == pytest.approx(pairs)
    assert np.isnan(auroc(scores, np.ones(40)))
