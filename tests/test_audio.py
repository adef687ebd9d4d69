"""models/ast/audio.py: the Kaldi fbank front end against an independent numpy reference and
kaldi-native-fbank, SpecAugment / padding / normalisation, WAV reading and its errors, the clip
collections (synthetic, ESC-50, WAV folder) and the grain dataset."""
from __future__ import annotations

import csv
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.io import wavfile

from models.ast import audio
from trainer.config import ConfigError

SR = 16000
LOG_EPS = -15.942385  # log(float32 eps)


# ----------------------------------------------------------------------------- numpy reference
_REF_BANKS: dict = {}


def _ref_mel_banks(num_bins, sr=SR, n_fft=512, low=20.0, high=0.0):
    """Kaldi MelBanks, written from the Kaldi definition with explicit loops (float64)."""
    key = (num_bins, sr, n_fft, low, high)
    if key in _REF_BANKS:
        return _REF_BANKS[key]

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    if high <= 0:
        high = sr / 2 + high
    mlo, mhi = mel(low), mel(high)
    step = (mhi - mlo) / (num_bins + 1)
    banks = np.zeros((n_fft // 2, num_bins))
    for b in range(num_bins):
        left, centre, right = mlo + b * step, mlo + (b + 1) * step, mlo + (b + 2) * step
        for k in range(n_fft // 2):
            m = mel(k * sr / n_fft)
            if left < m < right:
                banks[k, b] = (m - left) / (centre - left) if m <= centre else (right - m) / (
                    right - centre)
    _REF_BANKS[key] = banks
    return banks


def _ref_fbank(x, num_bins=128):
    """Kaldi fbank of one waveform [N], frame by frame, float64."""
    x = np.asarray(x, np.float64)
    length, hop, n_fft = 400, 160, 512
    banks = _ref_mel_banks(num_bins)
    out = []
    for start in range(0, len(x) - length + 1, hop):
        fr = x[start:start + length].copy()
        fr -= fr.mean()
        for i in range(length - 1, 0, -1):
            fr[i] -= 0.97 * fr[i - 1]
        fr[0] -= 0.97 * fr[0]
        fr *= np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / (length - 1))
                        for n in range(length)])
        padded = np.zeros(n_fft)
        padded[:length] = fr
        power = np.abs(np.fft.fft(padded)[: n_fft // 2]) ** 2
        out.append(np.log(np.maximum(power @ banks, np.finfo(np.float32).eps)))
    return np.array(out)


def _chirp(n, f0=200.0, f1=6000.0):
    t = np.arange(n) / SR
    dur = n / SR
    k = math.log(f1 / f0)
    return 0.5 * np.sin(2 * np.pi * f0 * dur * (np.exp(k * t / dur) - 1) / k)


@pytest.mark.parametrize("n", [16000, 12345])
def test_kaldi_fbank_matches_numpy_reference(n):
    rng = np.random.default_rng(0)
    # the chirp has a little background noise: a bin whose energy is within float32 rounding of
    # the frame's (~1e-7 of it) has no meaningful log value in either implementation
    x = np.stack([rng.uniform(-1, 1, n), _chirp(n) + 0.1 * rng.standard_normal(n)])
    x = x.astype(np.float32)
    got = np.asarray(jax.jit(audio.kaldi_fbank)(x))
    frames = 1 + (n - 400) // 160
    assert got.shape == (2, frames, 128) and got.dtype == np.float32
    assert frames == audio.num_frames(n)
    for b in range(2):
        np.testing.assert_allclose(got[b], _ref_fbank(x[b]), atol=1e-3, rtol=0)


def test_bin3_is_log_eps_at_128_bins():
    x = np.random.default_rng(1).standard_normal(4000).astype(np.float32)
    fb = np.asarray(audio.kaldi_fbank(x))
    assert np.all(fb[:, 3] == np.float32(LOG_EPS))
    assert np.all(fb[:, [2, 4]] > -10)  # its neighbours do see FFT bins


def test_kaldi_fbank_too_short_names_length():
    with pytest.raises(ValueError, match="399 samples"):
        audio.kaldi_fbank(np.zeros(399, np.float32))


@pytest.mark.parametrize("bins", [80, 112])
def test_kaldi_fbank_matches_kaldi_native_fbank(bins):
    knf = pytest.importorskip("kaldi_native_fbank")
    rng = np.random.default_rng(2)
    # a synthetic clip and noise; knf computes in float32, so a bin whose energy is a tiny part of
    # the frame's (low bins of a clean chirp, after pre-emphasis) would test its rounding, not ours
    signals = [rng.uniform(-1, 1, 12345).astype(np.float32),
               audio.synthetic_clips("train", num=3)[2][0]]
    for x in signals:
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0
        opts.frame_opts.window_type = "hanning"
        opts.mel_opts.num_bins = bins
        opts.mel_opts.low_freq = 20
        opts.use_energy = False
        if hasattr(opts.mel_opts, "is_librosa"):
            opts.mel_opts.is_librosa = False
        fb = knf.OnlineFbank(opts)
        fb.accept_waveform(SR, x.tolist())  # same values to both: neither rescales
        fb.input_finished()
        ref = np.stack([np.array(fb.get_frame(i)) for i in range(fb.num_frames_ready)])
        got = np.asarray(audio.kaldi_fbank(x, num_mel_bins=bins))
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- fbank ops
def test_pad_or_truncate():
    x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3) + 1
    p = np.asarray(audio.pad_or_truncate(x, 8))
    assert p.shape == (2, 8, 3)
    np.testing.assert_array_equal(p[:, :5], x)
    assert np.all(p[:, 5:] == 0)
    np.testing.assert_array_equal(audio.pad_or_truncate(x, 3), x[:, :3])


def test_spec_augment():
    x = jnp.asarray(np.random.default_rng(3).uniform(1, 2, (3, 10, 6)), jnp.float32)
    fm = jnp.array([[1, 2], [0, 0], [5, 1]], jnp.int32)
    tm = jnp.array([[0, 0], [7, 3], [2, 4]], jnp.int32)
    y = np.asarray(jax.jit(audio.spec_augment)(x, fm, tm))
    expect = np.asarray(x).copy()
    expect[0, :, 1:3] = 0
    expect[1, 7:10, :] = 0
    expect[2, :, 5] = 0
    expect[2, 2:6, :] = 0
    np.testing.assert_array_equal(y, expect)
    none = jnp.zeros((3, 2), jnp.int32)
    np.testing.assert_array_equal(audio.spec_augment(x, none, none), x)


def test_normalize_and_front_end():
    np.testing.assert_allclose(audio.normalize(jnp.array([3.0, -1.0]), 1.0, 2.0), [0.5, -0.5])
    rng = np.random.default_rng(4)
    w = rng.uniform(-0.5, 0.5, (2, 8000)).astype(np.float32)
    fm = jnp.array([[10, 5], [0, 0]], jnp.int32)
    tm = jnp.array([[0, 0], [3, 2]], jnp.int32)
    f = jax.jit(lambda w, fm, tm: audio.front_end(w + 0.25, sample_rate=SR, num_mel_bins=64,
                                                  target_length=60, mean=-5.0, std=3.0,
                                                  freq_mask=fm, time_mask=tm))
    y = np.asarray(f(w, fm, tm))
    assert y.shape == (2, 60, 64) and y.dtype == np.float32
    raw = np.asarray(audio.kaldi_fbank(w - w.mean(-1, keepdims=True), num_mel_bins=64))
    assert raw.shape == (2, 48, 64)
    np.testing.assert_allclose(y[1, :3], (raw[1, :3] + 5) / 6, atol=1e-4)  # DC offset removed
    np.testing.assert_allclose(y[0, :, 10:15], 5 / 6, rtol=1e-6)  # masked: 0 -> (0 + 5) / 6
    np.testing.assert_allclose(y[1, 3:5], 5 / 6, rtol=1e-6)
    np.testing.assert_allclose(y[:, 48:], 5 / 6, rtol=1e-6)  # padded frames
    assert np.all(np.abs(y[0, :48, :10] - 5 / 6) > 1e-3)  # unmasked bins are not


# ----------------------------------------------------------------------------- WAV reading
def _sine(freq, rate, seconds=0.5):
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


@pytest.mark.parametrize("dtype,scale,offset", [(np.int16, 32767, 0), (np.int32, 2 ** 31 - 1, 0),
                                                (np.uint8, 127, 128), (np.float32, 1.0, 0),
                                                (np.float64, 1.0, 0)])
def test_read_wav_formats(tmp_path, dtype, scale, offset):
    x = 0.5 * _sine(440, SR)
    path = str(tmp_path / "a.wav")
    pcm = x if scale == 1.0 else np.round(x * scale) + offset
    wavfile.write(path, SR, pcm.astype(dtype))
    y = audio.read_wav(path)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1.5 / 128 if dtype == np.uint8 else 1e-4)


def test_read_wav_stereo_mean(tmp_path):
    x = 0.5 * _sine(440, SR)
    path = str(tmp_path / "s.wav")
    wavfile.write(path, SR, np.stack([x, np.zeros_like(x)], 1).astype(np.float32))
    np.testing.assert_allclose(audio.read_wav(path), x / 2, atol=1e-6)


@pytest.mark.parametrize("rate,freq", [(8000, 1000.0), (44100, 3000.0)])
def test_read_wav_resamples(tmp_path, rate, freq):
    path = str(tmp_path / "r.wav")
    wavfile.write(path, rate, (0.5 * _sine(freq, rate, 1.0) * 32767).astype(np.int16))
    y = audio.read_wav(path)
    assert abs(len(y) - SR) <= 1
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * SR / len(y)
    assert abs(peak_hz - freq) <= 1.0


def test_read_wav_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a wave file at all" * 10)
    wide = str(tmp_path / "int64.wav")
    wavfile.write(wide, SR, np.zeros(1000, np.int64))
    short = str(tmp_path / "short.wav")
    wavfile.write(short, SR, np.zeros(399, np.int16))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(open(short, "rb").read()[:30])
    for path, what in [(empty, "empty"), (garbage, "not a readable WAV"), (wide, "int64"),
                       (short, "too short"), (truncated, "not a readable WAV")]:
        with pytest.raises(audio.AudioDataError, match=what) as e:
            audio.read_wav(str(path))
        assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- clip collections
def test_synthetic_clips():
    a = audio.synthetic_clips("train", num=10, seconds=0.25)
    b = audio.synthetic_clips("train", num=10, seconds=0.25)
    ev = audio.synthetic_clips("eval", num=10, seconds=0.25)
    other = audio.synthetic_clips("train", num=10, seconds=0.25, seed=1)
    assert a.classes == list(audio.SYNTH_CLASSES) and len(a) == 10
    for i in range(10):
        x, label = a[i]
        assert x.shape == (4000,) and x.dtype == np.float32 and np.abs(x).max() <= 1
        assert label == i % 8 and a.name(i) == f"synthetic/{i}"
        np.testing.assert_array_equal(x, b[i][0])
        assert not np.allclose(x, ev[i][0]) and not np.allclose(x, other[i][0])
    sub = audio.synthetic_clips("train", num=6, classes=["chirp_down", "tone_low"], seconds=0.25)
    assert sub.classes == ["chirp_down", "tone_low"] and [sub[i][1] for i in range(6)] == [0, 1] * 3
    with pytest.raises(ConfigError, match="bogus"):
        audio.synthetic_clips("train", num=4, classes=["bogus"])


def test_synthetic_classes_differ_in_fbank():
    """Tones and chirps sit where they should: the low tone's energy is in low bins, the high
    tone's in high bins, an up chirp's peak bin rises over time and a down chirp's falls."""
    clips = audio.synthetic_clips("train", num=8, seed=3)
    fb = np.asarray(audio.kaldi_fbank(np.stack([clips[i][0] for i in range(4)]), num_mel_bins=64))
    peak = fb.argmax(-1)  # [4, T]
    assert np.median(peak[0]) < np.median(peak[1])
    assert peak[2, -10:].mean() > peak[2, :10].mean() + 5
    assert peak[3, -10:].mean() < peak[3, :10].mean() - 5


def test_synthetic_esc50_round_trip(tmp_path):
    root = str(tmp_path / "esc")
    audio.write_synthetic_esc50(root, num_per_class_per_fold=1, folds=3, seconds=0.25, seed=5)
    ev = audio.esc50(root, "eval", eval_folds=(3,))
    tr = audio.esc50(root, "train", eval_folds=(3,))
    assert ev.classes == list(audio.SYNTH_CLASSES) and len(ev) == 8 and len(tr) == 16
    assert sorted(ev[i][1] for i in range(8)) == list(range(8))
    assert all(os.path.basename(ev.name(i)).startswith("3-") for i in range(8))
    assert {os.path.basename(tr.name(i))[0] for i in range(16)} == {"1", "2"}
    for i in (0, 7):
        x, label = ev[i]
        k = int(os.path.basename(ev.name(i)).split("-")[1])
        ref = audio.synthetic_clip(audio.SYNTH_CLASSES[label],
                                   np.random.default_rng((7, 5, 103, k)), seconds=0.25)
        np.testing.assert_allclose(x, ref, atol=1 / 32768 + 1e-6)
    assert not np.allclose(ev[0][0], tr[0][0])  # folds use different streams
    sub = audio.esc50(root, "eval", eval_folds=(3,), classes=["click_train", "tone_high"])
    assert sub.classes == ["click_train", "tone_high"] and sorted(sub.labels) == [0, 1]

    csv_path = os.path.join(root, "meta", "esc50.csv")
    wav0 = ev.name(0)
    stamps = os.stat(csv_path).st_mtime_ns, os.stat(wav0).st_mtime_ns
    audio.write_synthetic_esc50(root, num_per_class_per_fold=1, folds=3, seconds=0.25, seed=5)
    assert (os.stat(csv_path).st_mtime_ns, os.stat(wav0).st_mtime_ns) == stamps
    first = ev[0][0]
    audio.write_synthetic_esc50(root, num_per_class_per_fold=1, folds=3, seconds=0.25, seed=6)
    assert os.stat(csv_path).st_mtime_ns != stamps[0]  # other parameters: rewritten
    assert not np.array_equal(audio.esc50(root, "eval", eval_folds=(3,))[0][0], first)
    os.remove(csv_path)  # an interrupted write (CSV missing) is redone
    audio.write_synthetic_esc50(root, num_per_class_per_fold=1, folds=3, seconds=0.25, seed=6)
    assert os.path.isfile(csv_path)


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_esc50_errors_and_skip_bad(tmp_path):
    good = str(tmp_path / "good")
    audio.write_synthetic_esc50(good, num_per_class_per_fold=1, folds=2, seconds=0.1)

    def broken(name, edit):
        root = str(tmp_path / name)
        shutil.copytree(good, root)
        _rewrite_csv(os.path.join(root, "meta", "esc50.csv"), edit)
        return root

    def drop_fold_column(rows):
        for r in rows:
            del r[1]

    def bad_fold(rows):
        rows[3][1] = "x"

    def missing_file(rows):
        rows[5][0] = "nope.wav"

    for name, edit, what in [("col", drop_fold_column, "lacks column.*fold"),
                             ("fold", bad_fold, "line 4.*fold 'x'"),
                             ("file", missing_file, "line 6.*nope.wav")]:
        root = broken(name, edit)
        with pytest.raises(ConfigError, match=what) as e:
            audio.esc50(root, "train", eval_folds=(2,))
        assert os.path.join(root, "meta", "esc50.csv") in str(e.value)
    with pytest.raises(ConfigError, match="eval_folds"):
        audio.esc50(good, "train", eval_folds=(7,))

    root = broken("bad_wav", lambda rows: None)
    bad = os.path.join(root, "audio", "1-000002-A-2.wav")
    with open(bad, "wb") as f:
        f.write(b"RIFF garbage")
    with pytest.raises(ConfigError, match=r"(?s)1 of the 8 audio files .*1-000002-A-2\.wav.* no "
                                          r"RIFF/WAVE header"):
        audio.esc50(root, "train", eval_folds=(2,))  # the up-front header pass
    with open(bad, "wb") as f:
        f.write(b"RIFF\x00\x00\x00\x00WAVEgarbage")  # a header, then nothing readable
    lenient = audio.esc50(root, "train", eval_folds=(2,))  # decoded when read
    assert len(lenient) == 8
    with pytest.raises(audio.AudioDataError, match="1-000002-A-2.wav"):
        lenient[lenient.files.index(bad)]
    with pytest.warns(UserWarning, match=r"skipped 1 .*1-000002-A-2\.wav"):
        skipped = audio.esc50(root, "train", eval_folds=(2,), skip_bad=True)
    assert len(skipped) == 7 and bad not in skipped.files


def test_wav_folder(tmp_path):
    root = tmp_path / "tree"
    files = {}
    for c, freq in [("beep", 500.0), ("alarm", 2000.0), ("hum", 100.0)]:
        (root / c).mkdir(parents=True)
        for j in range(5):
            p = str(root / c / f"{c}{j}.wav")
            wavfile.write(p, SR, (0.3 * _sine(freq, SR, 0.05) * 32767).astype(np.int16))
            files[p] = c
    tr = audio.wav_folder(str(root), "train")
    ev = audio.wav_folder(str(root), "eval")
    assert tr.classes == ev.classes == ["alarm", "beep", "hum"]
    names_tr = {tr.name(i) for i in range(len(tr))}
    names_ev = {ev.name(i) for i in range(len(ev))}
    assert not names_tr & names_ev and names_tr | names_ev == set(files)
    assert sorted(set(ev.labels)) == sorted(set(tr.labels)) == [0, 1, 2]
    assert len(ev) == 3  # round(0.2 * 5) = 1 per class
    for i in range(len(ev)):
        x, label = ev[i]
        assert x.shape == (800,) and ev.classes[label] == files[ev.name(i)]
    assert names_ev == {audio.wav_folder(str(root), "eval").name(i) for i in range(3)}
    sub = audio.wav_folder(str(root), "train", classes=["hum", "alarm"])
    assert sub.classes == ["hum", "alarm"] and set(sub.labels) == {0, 1}
    assert all(sub.classes[sub.labels[i]] == files[sub.name(i)] for i in range(len(sub)))

    with pytest.raises(ConfigError, match="missing"):
        audio.wav_folder(str(tmp_path / "missing"), "train")
    (root / "empty").mkdir()
    with pytest.raises(ConfigError, match=str(root / "empty")):
        audio.wav_folder(str(root), "train")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        audio.wav_folder(str(root / "hum"), "train")


# ----------------------------------------------------------------------------- grain dataset
def test_clip_dataset_train_and_eval():
    clips = audio.synthetic_clips("train", num=8, seconds=0.25)
    kw = dict(num_samples=4800, num_frames=30, num_mel_bins=64)
    ds = audio.clip_dataset(clips, "train", seed=1, mixup=1.0, freqm=10, timem=8, **kw)
    mixed = 0
    for i in range(12):
        ex = ds[i]
        assert ex["waveform"].shape == (4800,) and ex["waveform"].dtype == np.float32
        assert np.all(ex["waveform"][4000:] == 0)  # 0.25 s clips, zero-padded at the end
        assert ex["label"].dtype == np.int32 and ex["id"].dtype == np.int32
        t = ex["targets"]
        assert t.shape == (8,) and t.dtype == np.float32
        assert abs(t.sum() - 1) < 1e-6 and np.count_nonzero(t) <= 2 and t[ex["label"]] > 0
        mixed += np.count_nonzero(t) == 2
        (fs, fw), (ts, tw) = ex["freq_mask"], ex["time_mask"]
        assert 0 <= fw <= 10 and 0 <= fs <= 64 - fw and 0 <= tw <= 8 and 0 <= ts <= 30 - tw
        assert ex["label"] == clips.labels[ex["id"]]
    assert mixed >= 8  # Beta(10, 10) mixes with another clip nearly always of another class
    np.testing.assert_array_equal(ds[3]["waveform"], ds[3]["waveform"])  # deterministic per index

    plain = audio.clip_dataset(clips, "train", seed=1, **kw)
    ex = plain[0]
    x, _ = clips[int(ex["id"])]
    np.testing.assert_allclose(ex["waveform"][:4000], x - x.mean(), atol=1e-6)
    assert np.count_nonzero(ex["targets"]) == 1 and list(ex["freq_mask"]) == [ex["freq_mask"][0], 0]

    ev = audio.clip_dataset(clips, "eval", **kw)
    assert len(ev) == 8
    a, b = ev[5], ev[5]
    np.testing.assert_array_equal(a["waveform"], b["waveform"])
    assert a["id"] == 5 and a["label"] == 5 and a["targets"][5] == 1 and a["targets"].sum() == 1
    assert list(a["freq_mask"]) == [0, 0] and list(a["time_mask"]) == [0, 0]
    np.testing.assert_array_equal(a["waveform"][:4000], clips[5][0])


def test_fbank_stats_matches_numpy():
    clips = audio.synthetic_clips("train", num=5, seconds=0.5)
    mean, std = audio.fbank_stats(clips, num_mel_bins=32, target_length=60, batch=2)
    rows = []
    for i in range(5):
        x = clips[i][0]
        fb = np.asarray(audio.kaldi_fbank(x - x.mean(), num_mel_bins=32))  # [48, 32]
        rows.append(np.concatenate([fb, np.zeros((60 - len(fb), 32), np.float32)]))
    allv = np.concatenate(rows).astype(np.float64)
    assert mean == pytest.approx(allv.mean(), rel=1e-5)
    assert std == pytest.approx(allv.std(), rel=1e-5)


def test_stats_cli(capsys):
    audio.main(["stats", "--source=synthetic", "--num=2", "--num_mel_bins=32",
                "--target_length=60"])
    out = capsys.readouterr().out
    assert "clips=2" in out and "mean=" in out and "std=" in out


def test_spectrogram_image():
    fb = np.zeros((7, 5), np.float32)
    fb[:, 0] = 10.0  # loudest in bin 0: the bottom rows
    img = audio.spectrogram_image(fb)
    assert img.shape == (10, 14, 3) and img.dtype == np.uint8
    assert img[-2:].sum(-1).min() > img[:-2].sum(-1).max()
    assert np.all(img[:-2] == img[0, 0])
