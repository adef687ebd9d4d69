"""Audio front end and audio data for the Audio Spectrogram Transformer family (AST, PETL_AST).

Front end. AST (YuanGongND/ast `src/dataloader.py` `_wav2fbank`) feeds the model Kaldi log mel
filterbanks as computed by `torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
window_type='hanning', dither=0.0, ...)`. `kaldi_fbank` is the same computation in jnp, so it runs
inside the jitted train step on whatever device holds the batch: frames are gathered with one index
array (static shapes), every per-frame step is a vectorised op over the frame axis, the spectrum is
`jnp.fft.rfft`, and the mel filters are one fixed matrix built once with numpy (cached per
(sample_rate, n_fft, bins, low, high)). The data pipeline therefore only moves raw waveforms and the
SpecAugment draws ((start, width) per example); `front_end` turns them into the normalised
[B, frames, bins] input: clip mean removed, fbank, pad/truncate to target_length frames,
SpecAugment, (x - mean) / (2 std). That is AST's order: masks set fbank values to 0 *before*
normalisation, and padded frames are 0 before normalisation too.

Data. A `Clips` is a random-access collection of (waveform float32 [N], label) with class names:
`synthetic_clips` (8 procedurally generated sound classes, no download), `wav_folder`
(root/<class>/*.wav) and `esc50` (the ESC-50 layout, meta/esc50.csv + audio/);
`write_synthetic_esc50` writes the synthetic classes as a real ESC-50 tree, so the file path is
exercised without data. `clip_dataset` turns a Clips into a grain dataset of fixed-length waveforms
with mixup (AST mixes waveforms, lam ~ Beta(10, 10)) and SpecAugment draws; as in models/images.py,
the augmentation is a `random_map` after `repeat`, so its generator is seeded by (seed, index in the
repeated stream): deterministic per (seed, example, epoch) and different from one epoch to the next.
Synthetic clip i is drawn from its own generator `np.random.default_rng((7, seed, stream, i))`, so
it is the same whatever the order of reads or the worker.

One deliberate difference from AST: batches need one waveform length, so `clip_dataset` crops or
zero-pads waveforms to num_samples; zero samples give log(eps) frames where AST (which pads the
fbank, not the waveform) has 0. Choose num_samples to cover the clips (ESC-50: 5 s) and
target_length = 1 + (num_samples - 400) // 160 frames to avoid both.
"""
from __future__ import annotations

import abc
import argparse
import csv
import functools
import json
import math
import os
import struct
import sys
import warnings
import zlib
from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from trainer.config import ConfigError
from trainer.data import BadExample, check_files

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Kaldi/torchaudio log floor, 1.1920929e-07

SYNTH_CLASSES: tuple[str, ...] = ("tone_low", "tone_high", "chirp_up", "chirp_down", "am_tone",
                                  "white_burst", "pink_burst", "click_train")

WAV_FORMATS = "16/24/32-bit integer PCM, 8-bit unsigned PCM, 32/64-bit float"

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


class AudioDataError(BadExample):
    """An audio file that cannot be used (`path`); the message names the file, what is wrong and
    what is allowed."""


def wav_header(path: str) -> None:
    """The up-front check of a WAV file (trainer.data.check_files): its RIFF/WAVE header."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioDataError(path, f"audio file {path!r} has no RIFF/WAVE header; expected an "
                                   "uncompressed WAV file")


# ----------------------------------------------------------------------------- Kaldi fbank
def _frame_sizes(sample_rate: int, frame_length_ms: float, frame_shift_ms: float
                 ) -> tuple[int, int, int]:
    """(window length L, hop, n_fft) in samples."""
    # torchaudio/Kaldi: WindowSize = int(samp_freq * frame_length_ms * 0.001), same for the shift
    length = int(sample_rate * frame_length_ms * 0.001)
    hop = int(sample_rate * frame_shift_ms * 0.001)
    if length < 2 or hop < 1:
        raise ValueError(f"frame of {length} samples / shift of {hop} samples at {sample_rate} "
                         f"Hz: need a frame of at least 2 samples and a shift of at least 1")
    # Kaldi round_to_power_of_two: the smallest power of two >= the window length
    n_fft = 1 << (length - 1).bit_length()
    return length, hop, n_fft


def num_frames(num_samples: int, *, sample_rate: int = 16000, frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0) -> int:
    """Frames of a clip of num_samples (Kaldi snip_edges=True): 1 + (N - L) // hop, 0 if N < L."""
    length, hop, _ = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    return 0 if num_samples < length else 1 + (num_samples - length) // hop


def _mel(f):
    # Kaldi: mel(f) = 1127 ln(1 + f/700)
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=32)
def kaldi_mel_banks(sample_rate: int, n_fft: int, num_mel_bins: int, low_freq: float,
                    high_freq: float) -> np.ndarray:
    """Kaldi's mel filter matrix, float32 [n_fft // 2, num_mel_bins] (read-only, cached).

    Triangles equally spaced in mel between low_freq and high_freq (<= 0: nyquist + high_freq),
    evaluated at FFT bin k's frequency k * sr / n_fft for k < n_fft / 2 (Kaldi has no Nyquist
    column). A filter narrower than the bin spacing can contain no bin and is all zero (at 128 bins,
    16 kHz, 512 FFT: filter 3), so its log energy is exactly log(eps)."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not (0.0 <= low_freq < nyquist and low_freq < high <= nyquist):
        raise ValueError(f"mel banks: need 0 <= low_freq ({low_freq}) < high_freq ({high}, from "
                         f"high_freq={high_freq}) <= nyquist ({nyquist})")
    if num_mel_bins < 3:
        raise ValueError(f"num_mel_bins={num_mel_bins}: Kaldi needs at least 3")
    mel_low, mel_high = _mel(low_freq), _mel(high)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)  # Kaldi: bins + 1 intervals, bins + 2 edges
    m = np.arange(num_mel_bins, dtype=np.float64)[None, :]
    left, center, right = mel_low + m * delta, mel_low + (m + 1) * delta, mel_low + (m + 2) * delta
    mel = _mel(np.arange(n_fft // 2) * (sample_rate / n_fft))[:, None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
    banks.flags.writeable = False
    return banks


def kaldi_fbank(waveform, *, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                preemphasis: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0,
                remove_dc_offset: bool = True) -> jnp.ndarray:
    """Kaldi log mel filterbank, as torchaudio.compliance.kaldi.fbank(htk_compat=True,
    use_energy=False, window_type='hanning', dither=0.0, snip_edges=True).

    waveform: float [..., N] (any leading axes, any scale: Kaldi does not rescale).
    Returns float32 [..., num_frames, num_mel_bins], num_frames = 1 + (N - L) // hop (L = 400, hop
    = 160 at 16 kHz). Pure jnp, jit-able (all arguments but waveform must be static).
    """
    x = jnp.asarray(waveform, jnp.float32)
    n = x.shape[-1]
    length, hop, n_fft = _frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    if n < length:
        raise ValueError(f"kaldi_fbank: waveform of {n} samples is shorter than one frame "
                         f"({length} samples = {frame_length_ms} ms at {sample_rate} Hz)")
    t = 1 + (n - length) // hop
    idx = np.arange(t)[:, None] * hop + np.arange(length)[None, :]  # [T, L], static
    frames = x[..., idx]  # [..., T, L]
    if remove_dc_offset:
        frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
    # Kaldi preemphasis: x[i] -= p x[i-1] with x[-1] := x[0] (sample 0 is then zeroed by the Hann
    # window, but kept exact for other windows)
    prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - preemphasis * prev
    # Kaldi "hanning" (symmetric Hann): w[n] = 0.5 - 0.5 cos(2 pi n / (L - 1))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    spec = jnp.fft.rfft(frames * window.astype(np.float32), n=n_fft, axis=-1)
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    banks = kaldi_mel_banks(sample_rate, n_fft, num_mel_bins, float(low_freq), float(high_freq))
    # HIGHEST: on GPU/TPU a default-precision f32 matmul may use TF32/bf16 passes, which is
    # visible in the log of small energies
    energies = jnp.matmul(power[..., : n_fft // 2], banks, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(energies, FLOAT32_EPS))


def pad_or_truncate(fbank, target_length: int):
    """[..., T, F] -> [..., target_length, F]: zero frames appended at the end, or the first
    target_length frames (AST's dataloader)."""
    t = fbank.shape[-2]
    if t >= target_length:
        return fbank[..., :target_length, :]
    pad = [(0, 0)] * (fbank.ndim - 2) + [(0, target_length - t), (0, 0)]
    return jnp.pad(fbank, pad)


def _band(size: int, mask) -> jnp.ndarray:
    """bool [B, size]: start <= i < start + width per row of mask int [B, 2] = (start, width)."""
    mask = jnp.asarray(mask, jnp.int32)
    i = jax.lax.broadcasted_iota(jnp.int32, (mask.shape[0], size), 1)
    start, width = mask[:, :1], mask[:, 1:]
    return (i >= start) & (i < start + width)


def spec_augment(fbank, freq_mask=None, time_mask=None):
    """SpecAugment (torchaudio FrequencyMasking / TimeMasking, mask value 0), one band of each.

    fbank: [B, T, F]; freq_mask, time_mask: int32 [B, 2] = (start, width) per example, or None
    for no mask of that kind. Bins start..start+width-1 (frames, for time) are set to 0; width 0
    masks nothing. Static shapes (iota comparisons), jit-able."""
    b, t, f = fbank.shape
    masked = jnp.zeros((b, t, f), bool)
    if freq_mask is not None:
        masked = masked | _band(f, freq_mask)[:, None, :]
    if time_mask is not None:
        masked = masked | _band(t, time_mask)[:, :, None]
    return jnp.where(masked, jnp.zeros((), fbank.dtype), fbank)


def normalize(fbank, mean: float, std: float):
    """AST's normalisation: (fbank - mean) / (2 std)."""
    return (fbank - mean) / (2.0 * std)


def front_end(waveform, *, sample_rate: int = 16000, num_mel_bins: int = 128,
              target_length: int, mean: float, std: float, freq_mask=None, time_mask=None):
    """AST's input from raw waveforms, inside the jitted step.

    waveform: float [B, N]; freq_mask, time_mask: int32 [B, 2] (start, width) or None.
    Returns float32 [B, target_length, num_mel_bins]: each clip minus its mean (AST
    `_wav2fbank`), `kaldi_fbank`, `pad_or_truncate`, `spec_augment`, `normalize`."""
    x = jnp.asarray(waveform, jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    fb = pad_or_truncate(kaldi_fbank(x, sample_rate=sample_rate, num_mel_bins=num_mel_bins),
                         target_length)
    if freq_mask is not None or time_mask is not None:
        fb = spec_augment(fb, freq_mask, time_mask)
    return normalize(fb, mean, std)


@functools.partial(jax.jit, static_argnames=("sample_rate", "num_mel_bins", "target_length"))
def _padded_fbank(x, *, sample_rate, num_mel_bins, target_length):
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return pad_or_truncate(kaldi_fbank(x, sample_rate=sample_rate, num_mel_bins=num_mel_bins),
                           target_length)


def fbank_stats(clips: "Clips", *, sample_rate: int = 16000, num_mel_bins: int = 128,
                target_length: int, batch: int = 64) -> tuple[float, float]:
    """(mean, std) of every value of the clips' fbanks, for `normalize`.

    As AST's `get_norm_stats.py`, the statistics are over the un-normalised, un-augmented input:
    mean-removed clip, fbank, padded/truncated to target_length frames (the zero padding frames
    count). Unlike it (the average of per-batch means and stds), this is the exact pooled mean and
    population std over all values, so it does not depend on the batch size. Clips of one length
    are batched together (one compilation per distinct (batch, length))."""
    if len(clips) == 0:
        raise ConfigError("fbank_stats: no clips")
    total = total_sq = 0.0
    count = 0
    pending: dict[int, list[np.ndarray]] = {}

    def flush(group):
        nonlocal total, total_sq, count
        fb = np.asarray(_padded_fbank(np.stack(group), sample_rate=sample_rate,
                                      num_mel_bins=num_mel_bins, target_length=target_length),
                        np.float64)
        total += fb.sum()
        total_sq += np.square(fb).sum()
        count += fb.size

    for i in range(len(clips)):
        w = clips[i][0]
        group = pending.setdefault(len(w), [])
        group.append(w)
        if len(group) == batch:
            flush(group)
            pending[len(w)] = []
    for group in pending.values():
        if group:
            flush(group)
    mean = total / count
    return float(mean), float(math.sqrt(max(total_sq / count - mean * mean, 0.0)))


# ----------------------------------------------------------------------------- WAV files
def read_wav(path: str, sample_rate: int = 16000) -> np.ndarray:
    """A WAV file as float32 [N] in [-1, 1] at sample_rate.

    Integer PCM is scaled by its full range (uint8 around 128; scipy returns 24-bit PCM as
    left-aligned int32, so it scales like int32); float PCM is taken as is. Several channels are
    averaged. Another file rate is resampled with a polyphase filter (scipy resample_poly, up/down
    reduced by their gcd). Raises AudioDataError naming the file for an empty or corrupt file, an
    unsupported sample format, or a clip shorter than one 25 ms frame after resampling."""
    from scipy import signal
    from scipy.io import wavfile
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AudioDataError(path, f"cannot read audio file {path!r}: {e}") from None
    if size == 0:
        raise AudioDataError(path, f"audio file {path!r} is empty (0 bytes); expected a WAV file")
    try:
        with warnings.catch_warnings():  # unknown non-data chunks (LIST, ...) are skipped: fine
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, data = wavfile.read(path)
    # (scipy raises UnboundLocalError for a RIFF/WAVE header without a fmt chunk)
    except (ValueError, EOFError, OSError, struct.error, IndexError, TypeError,
            UnboundLocalError) as e:
        raise AudioDataError(path, f"audio file {path!r} is not a readable WAV file ({e}); allowed: "
                             f"uncompressed WAV with {WAV_FORMATS} samples") from None
    data = np.asarray(data)
    if data.dtype == np.int16:
        x = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        x = (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype in (np.float32, np.float64):
        x = data.astype(np.float32)
    else:
        raise AudioDataError(path, f"audio file {path!r} has samples of type {data.dtype}, which is not "
                             f"supported; allowed: {WAV_FORMATS}")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.size == 0:
        raise AudioDataError(path, f"audio file {path!r} has no samples; expected at least one 25 ms "
                             f"frame")
    if rate != sample_rate:
        if rate <= 0:
            raise AudioDataError(path, f"audio file {path!r} has sample rate {rate}; need a positive "
                                 f"rate")
        g = math.gcd(int(rate), int(sample_rate))
        x = signal.resample_poly(x, sample_rate // g, int(rate) // g).astype(np.float32)
    frame = int(sample_rate * 25.0 * 0.001)
    if len(x) < frame:
        raise AudioDataError(path, f"audio file {path!r} is too short: {len(x)} samples at "
                             f"{sample_rate} Hz (file: {data.shape[0]} at {rate} Hz); need at "
                             f"least one 25 ms frame ({frame} samples)")
    return x


def write_wav(path: str, waveform: np.ndarray, sample_rate: int = 16000) -> None:
    """Write float [N] in [-1, 1] as 16-bit PCM (clipped, rounded), atomically (temp + rename)."""
    from scipy.io import wavfile
    pcm = np.clip(np.round(np.asarray(waveform, np.float64) * 32768.0), -32768, 32767)
    tmp = f"{path}.tmp{os.getpid()}"
    wavfile.write(tmp, sample_rate, pcm.astype(np.int16))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- synthetic sounds
def _ramp(n: int, sr: int, ms: float = 5.0) -> np.ndarray:
    """Raised-cosine fade in and out over ms, so bursts do not start with a click."""
    k = max(1, min(n // 2, int(sr * ms / 1000)))
    env = np.ones(n)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
    env[:k], env[n - k:] = fade, fade[::-1]
    return env


def _burst(rng: np.random.Generator, n: int, sr: int, pink: bool) -> np.ndarray:
    dur = min(n, int(rng.uniform(0.2, 0.6) * sr))
    start = int(rng.integers(0, n - dur + 1))
    noise = rng.standard_normal(dur)
    if pink:  # 1/f power: amplitude spectrum scaled by 1/sqrt(f), no DC
        spec = np.fft.rfft(noise)
        f = np.arange(len(spec), dtype=np.float64)
        spec[1:] /= np.sqrt(f[1:])
        spec[0] = 0.0
        noise = np.fft.irfft(spec, n=dur)
    noise /= np.sqrt(np.mean(noise ** 2)) + 1e-12
    out = np.zeros(n)
    out[start:start + dur] = noise * _ramp(dur, sr)
    return out


def _synth(kind: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One clip of a class, unit peak (before level and background noise), float64 [n]."""
    t = np.arange(n) / sr
    dur = n / sr
    phase0 = rng.uniform(0, 2 * np.pi)
    if kind in ("tone_low", "tone_high"):
        f = rng.uniform(200, 600) if kind == "tone_low" else rng.uniform(1500, 4000)
        x = np.sin(2 * np.pi * f * t + phase0)
    elif kind in ("chirp_up", "chirp_down"):
        ratio = rng.uniform(2.5, 5.0)  # > one octave over the clip
        if kind == "chirp_up":
            f0, f1 = (lo := rng.uniform(250, 700)), lo * ratio
        else:
            f0, f1 = (hi := rng.uniform(1500, 4000)), hi / ratio
        # exponential sweep f(t) = f0 (f1/f0)^(t/T); its phase, the integral of 2 pi f:
        # 2 pi f0 T ((f1/f0)^(t/T) - 1) / ln(f1/f0)
        k = math.log(f1 / f0)
        x = np.sin(2 * np.pi * f0 * dur * (np.exp(k * t / dur) - 1) / k + phase0)
    elif kind == "am_tone":
        fc, fm, depth = rng.uniform(500, 2500), rng.uniform(4, 16), rng.uniform(0.7, 1.0)
        env = (1 + depth * np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))) / (1 + depth)
        x = env * np.sin(2 * np.pi * fc * t + phase0)
    elif kind in ("white_burst", "pink_burst"):
        x = _burst(rng, n, sr, pink=kind == "pink_burst")
    elif kind == "click_train":
        rate = rng.uniform(5, 30)
        width = max(2, int(0.002 * sr))  # 2 ms decaying noise clicks: broadband, short
        click = rng.standard_normal(width) * np.exp(-np.arange(width) / (0.3 * width))
        x = np.zeros(n)
        for c in np.arange(rng.uniform(0, 1 / rate), dur, 1 / rate):
            s = int(c * sr)
            e = min(n, s + width)
            x[s:e] += click[: e - s]
    else:
        raise ConfigError(f"unknown synthetic class {kind!r}; classes: {SYNTH_CLASSES}")
    return x / (np.max(np.abs(x)) + 1e-12)


def synthetic_clip(kind: str, rng: np.random.Generator, *, sample_rate: int = 16000,
                   seconds: float = 1.0) -> np.ndarray:
    """One synthetic sound of class `kind` (a name in SYNTH_CLASSES), float32 [seconds * sr].

    Class-specific random parameters (tones 200-600 / 1500-4000 Hz, exponential chirps sweeping
    2.5-5x up from 250-700 Hz or down from 1500-4000 Hz, AM tone with 500-2500 Hz carrier and 4-16
    Hz modulation, white or 1/f noise bursts of 0.2-0.6 s at a random onset, 5-30 clicks/s), a
    random peak level in [0.1, 0.7], plus white background noise at a random SNR in [0, 20] dB
    (signal power over the whole clip); the result is kept within [-1, 1]."""
    n = int(round(seconds * sample_rate))
    if n < int(sample_rate * 0.025):
        raise ConfigError(f"synthetic clips of {seconds} s are shorter than one 25 ms frame")
    x = _synth(kind, rng, n, sample_rate) * rng.uniform(0.1, 0.7)
    snr_db = rng.uniform(0.0, 20.0)
    noise_power = np.mean(x ** 2) / 10 ** (snr_db / 10)  # SNR = 10 log10(P_signal / P_noise)
    x = x + rng.standard_normal(n) * np.sqrt(noise_power)
    peak = np.max(np.abs(x))
    if peak > 0.99:
        x *= 0.99 / peak
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- clip collections
class Clips(abc.ABC):
    """A random-access collection of labelled clips: clips[i] = (waveform float32 [N], label int);
    `classes[label]` is the label's name, `labels[i]` the label without decoding, `name(i)` a
    file path or "synthetic/<index>"."""

    classes: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"clip {i} of {len(self)}")
        return self._read(i), int(self.labels[i])

    @abc.abstractmethod
    def _read(self, i: int) -> np.ndarray:
        """The waveform of clip i, float32 [N]."""

    @abc.abstractmethod
    def name(self, i: int) -> str:
        """Clip i's file path (or "synthetic/<index>")."""


def _select_classes(all_names: Sequence[str], classes: Sequence[str] | None, what: str
                    ) -> list[str]:
    if classes is None:
        return list(all_names)
    classes = list(classes)
    bad = [c for c in classes if c not in all_names]
    if bad or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"{what}: classes {classes} must be distinct names among "
                          f"{list(all_names)} (unknown: {bad})")
    return classes


class SyntheticClips(Clips):
    """Clip i of class classes[i % k]: `synthetic_clip(classes[i % k], np.random.default_rng((7,
    seed, stream, i)))`, stream 0 for "train", 1 for "eval" (`synthetic_clips`)."""

    def __init__(self, num: int, *, seed: int, stream: int, sample_rate: int, seconds: float,
                 classes: Sequence[str]):
        self.classes = list(classes)
        self.labels = [i % len(self.classes) for i in range(num)]
        self.seed, self.stream, self.sample_rate, self.seconds = seed, stream, sample_rate, seconds

    def _read(self, i):
        rng = np.random.default_rng((7, self.seed, self.stream, i))
        return synthetic_clip(self.classes[self.labels[i]], rng, sample_rate=self.sample_rate,
                              seconds=self.seconds)

    def name(self, i):
        return f"synthetic/{i}"


def synthetic_clips(split: str, *, num: int, seed: int = 0, sample_rate: int = 16000,
                    seconds: float = 1.0, classes: Sequence[str] | None = None) -> Clips:
    """num synthetic clips of one split, balanced (clip i has label i % k). classes: a subset of
    SYNTH_CLASSES, labelled by its position in the given order (default: all, SYNTH_CLASSES'
    order). The splits use different generator streams, so they share no clip."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if num < 1:
        raise ConfigError(f"synthetic_clips: num={num} must be at least 1")
    names = _select_classes(SYNTH_CLASSES, classes, "synthetic_clips")
    return SyntheticClips(num, seed=seed, stream=0 if split == "train" else 1,
                          sample_rate=sample_rate, seconds=seconds, classes=names)


class FileClips(Clips):
    """Clips read from WAV files (`read_wav`, decoded at every read; errors name the file)."""

    def __init__(self, files: list[str], labels: list[int], classes: list[str], sample_rate: int):
        self.files, self.labels, self.classes = files, labels, classes
        self.sample_rate = sample_rate

    def _read(self, i):
        return read_wav(self.files[i], self.sample_rate)

    def name(self, i):
        return self.files[int(i)]


def _drop_bad(files: list[str], labels: list[int], sample_rate: int, what: str
              ) -> tuple[list[str], list[int]]:
    """skip_bad: decode each file once; drop the unreadable ones with one warning."""
    keep, bad = [], []
    for k, f in enumerate(files):
        try:
            read_wav(f, sample_rate)
            keep.append(k)
        except AudioDataError as e:
            bad.append((f, str(e)))
    if bad:
        shown = "; ".join(msg for _, msg in bad[:3])
        warnings.warn(f"{what}: skipped {len(bad)} unreadable audio file(s) of {len(files)}: "
                      f"{shown}{' ...' if len(bad) > 3 else ''}", stacklevel=3)
    if not keep:
        raise ConfigError(f"{what}: none of the {len(files)} audio files can be read")
    return [files[k] for k in keep], [labels[k] for k in keep]


def _usable(files: list[str], labels: list[int], sample_rate: int, what: str, skip_bad: bool
            ) -> tuple[list[str], list[int]]:
    """skip_bad: every file decoded once, the unreadable ones dropped (one warning); else every
    file's header checked, the bad ones listed at once in a ConfigError (check_files)."""
    if skip_bad:
        return _drop_bad(files, labels, sample_rate, what)
    check_files(files, wav_header, what=f"audio files of {what}", skip_bad=False)
    return files, labels


def _wav_files(folder: str) -> list[str]:
    out = []
    for d, dirs, names in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(names)
                if not f.startswith(".") and f.lower().endswith(".wav")]
    return out


def wav_folder(root: str, split: str, *, seed: int = 0, sample_rate: int = 16000,
               classes: Sequence[str] | None = None, eval_fraction: float = 0.2,
               skip_bad: bool = False) -> Clips:
    """Clips of root/<class>/**.wav; class names = the sorted folder names (or the `classes`
    subset, labelled in the given order).

    The split is per class, by a hash of each file's path relative to root (as models/images.py
    `list_image_folder`, so the same files go to eval on every machine): the
    max(1, round(eval_fraction * n)) files of a class with the lowest crc32(seed, path) are its
    eval files, so every class appears in both splits (a class needs >= 2 files). Listing errors
    raise ConfigError naming the path; unreadable files raise AudioDataError when read, or are
    dropped now (one warning) with skip_bad."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not os.path.isdir(root):
        raise ConfigError(f"wav_folder: root {root!r} does not exist or is not a directory")
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"wav_folder: eval_fraction={eval_fraction} must be in (0, 1)")
    found = sorted(x for x in os.listdir(root)
                   if not x.startswith(".") and os.path.isdir(os.path.join(root, x)))
    if not found:
        raise ConfigError(f"wav_folder: {root!r} has no class sub-folders (expected "
                          f"{root}/<class>/<clip>.wav)")
    names = _select_classes(found, classes, f"wav_folder {root!r}")
    files, labels = [], []
    for label, c in enumerate(names):
        folder = os.path.join(root, c)
        paths = _wav_files(folder)
        if len(paths) < 2:
            raise ConfigError(f"wav_folder: class folder {folder!r} has {len(paths)} .wav files; "
                              f"each class needs at least 2 (one for train, one for eval)")
        key = [zlib.crc32(f"{seed}:{os.path.relpath(p, root).replace(os.sep, '/')}".encode())
               for p in paths]
        order = sorted(range(len(paths)), key=lambda k: (key[k], paths[k]))
        held = set(order[:max(1, min(len(paths) - 1, round(eval_fraction * len(paths))))])
        chosen = [p for k, p in enumerate(paths) if (k in held) == (split == "eval")]
        files += chosen
        labels += [label] * len(chosen)
    files, labels = _usable(files, labels, sample_rate, f"wav_folder {root!r} ({split})", skip_bad)
    return FileClips(files, labels, names, sample_rate)


def esc50(root: str, split: str, *, eval_folds: Sequence[int] = (5,), sample_rate: int = 16000,
          classes: Sequence[str] | None = None, skip_bad: bool = False) -> Clips:
    """Clips of an ESC-50 tree: root/meta/esc50.csv (columns filename, fold, target, category,
    ...) and root/audio/<filename>. "eval" = the rows whose fold is in eval_folds, "train" = the
    others (5-fold cross-validation: rotate eval_folds). Class names are ordered by target id
    (label = position among the CSV's targets); `classes` selects categories by name, labelled in
    the given order. CSV errors (missing column, bad fold or target, a target with two categories,
    a missing audio file) raise ConfigError naming the file and row."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    csv_path = os.path.join(root, "meta", "esc50.csv")
    if not os.path.isfile(csv_path):
        raise ConfigError(f"esc50: {csv_path!r} not found (expected the ESC-50 layout "
                          f"root/meta/esc50.csv + root/audio/*.wav)")
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ESC50_COLUMNS[:4] if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"esc50: {csv_path!r} lacks column(s) {missing} (header: "
                              f"{reader.fieldnames}; need {list(ESC50_COLUMNS[:4])})")
        for line, r in enumerate(reader, start=2):
            where = f"{csv_path!r} line {line} ({r.get('filename')!r})"
            try:
                fold, target = int(r["fold"]), int(r["target"])
            except (TypeError, ValueError):
                raise ConfigError(f"esc50: {where}: fold {r['fold']!r} and target "
                                  f"{r['target']!r} must be integers") from None
            if fold < 1 or target < 0:
                raise ConfigError(f"esc50: {where}: unknown fold {fold} or target {target} "
                                  f"(folds are numbered from 1, targets from 0)")
            path = os.path.join(root, "audio", r["filename"] or "")
            if not r["filename"] or not os.path.isfile(path):
                raise ConfigError(f"esc50: {where}: audio file {path!r} does not exist")
            rows.append((path, fold, target, r["category"], where))
    if not rows:
        raise ConfigError(f"esc50: {csv_path!r} has no rows")
    category: dict[int, str] = {}
    for _, _, target, cat, where in rows:
        if category.setdefault(target, cat) != cat:
            raise ConfigError(f"esc50: {where}: target {target} is {cat!r} here but "
                              f"{category[target]!r} on an earlier row")
    folds = sorted({r[1] for r in rows})
    unknown = [k for k in eval_folds if k not in folds]
    if unknown or not eval_folds or set(eval_folds) >= set(folds):
        raise ConfigError(f"esc50: eval_folds {list(eval_folds)} must be a proper subset of the "
                          f"folds {folds} of {csv_path!r}")
    all_names = [category[t] for t in sorted(category)]
    names = _select_classes(all_names, classes, f"esc50 {csv_path!r}")
    files, labels = [], []
    for path, fold, target, cat, _ in rows:
        if cat in names and (fold in eval_folds) == (split == "eval"):
            files.append(path)
            labels.append(names.index(cat))
    if not files:
        raise ConfigError(f"esc50: the {split} split of {csv_path!r} is empty (eval_folds "
                          f"{list(eval_folds)}, classes {names})")
    files, labels = _usable(files, labels, sample_rate, f"esc50 {root!r} ({split})", skip_bad)
    return FileClips(files, labels, names, sample_rate)


def write_synthetic_esc50(root: str, *, num_per_class_per_fold: int, seed: int = 0,
                          sample_rate: int = 16000, seconds: float = 1.0, folds: int = 5) -> str:
    """The synthetic classes written as a real ESC-50 tree (read back with `esc50`); returns root.

    Fold f (1..folds) holds num_per_class_per_fold clips of each class of SYNTH_CLASSES; its k-th
    clip (class SYNTH_CLASSES[k % 8]) is `synthetic_clip(kind, np.random.default_rng((7, seed,
    100 + f, k)))`, written as 16-bit PCM to audio/<f>-<k:06d>-A-<target>.wav (ESC-50's
    {fold}-{clip id}-{take}-{target} naming); meta/esc50.csv has target = index in SYNTH_CLASSES,
    category = its name, esc10 False. Idempotent: meta/synthetic.json records the parameters; a
    tree with the same parameters, its CSV and every file present is not rewritten. The CSV is
    written last (temp file + rename) and removed before a rewrite, so an interrupted write is
    never taken as complete."""
    if num_per_class_per_fold < 1 or folds < 2:
        raise ConfigError(f"write_synthetic_esc50: num_per_class_per_fold "
                          f"({num_per_class_per_fold}) must be >= 1 and folds ({folds}) >= 2")
    params = dict(num_per_class_per_fold=num_per_class_per_fold, seed=seed,
                  sample_rate=sample_rate, seconds=float(seconds), folds=folds,
                  classes=list(SYNTH_CLASSES))
    meta, audio = os.path.join(root, "meta"), os.path.join(root, "audio")
    csv_path, marker = os.path.join(meta, "esc50.csv"), os.path.join(meta, "synthetic.json")
    k_per_fold = num_per_class_per_fold * len(SYNTH_CLASSES)
    rows = [(f"{f}-{k:06d}-A-{k % len(SYNTH_CLASSES)}.wav", f, k % len(SYNTH_CLASSES), k)
            for f in range(1, folds + 1) for k in range(k_per_fold)]
    try:
        with open(marker, encoding="utf-8") as fh:
            written = json.load(fh)
    except (OSError, ValueError):
        written = None
    if (written == params and os.path.isfile(csv_path)
            and all(os.path.isfile(os.path.join(audio, r[0])) for r in rows)):
        return root
    os.makedirs(meta, exist_ok=True)
    os.makedirs(audio, exist_ok=True)
    if os.path.exists(csv_path):
        os.remove(csv_path)  # first: a rewrite cut short must not look complete
    tmp = f"{marker}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(params, fh)
    os.replace(tmp, marker)
    for name, f, target, k in rows:
        x = synthetic_clip(SYNTH_CLASSES[target], np.random.default_rng((7, seed, 100 + f, k)),
                           sample_rate=sample_rate, seconds=seconds)
        write_wav(os.path.join(audio, name), x, sample_rate)
    tmp = f"{csv_path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(ESC50_COLUMNS)
        for name, f, target, k in rows:
            w.writerow([name, f, target, SYNTH_CLASSES[target], "False", f"{k:06d}", "A"])
    os.replace(tmp, csv_path)
    return root


# ----------------------------------------------------------------------------- grain dataset
def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """Crop to the first n samples or zero-pad at the end to n."""
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x, np.zeros(n - len(x), x.dtype)])


class _ClipIds:
    """Random-access source of clip indices: decoding happens in the map after it, so the train
    split's augmentation is drawn per (seed, index in the repeated stream)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return int(i)


class _EvalClip(grain.transforms.Map):
    def __init__(self, clips: Clips, num_samples: int):
        self.clips, self.num_samples = clips, num_samples

    def map(self, i):
        x, label = self.clips[i]
        k = len(self.clips.classes)
        return {"waveform": _fit(x, self.num_samples).astype(np.float32),
                "label": np.int32(label), "targets": np.eye(k, dtype=np.float32)[label],
                "freq_mask": np.zeros(2, np.int32), "time_mask": np.zeros(2, np.int32),
                "id": np.int32(i)}


class _TrainClip(grain.transforms.RandomMap):
    """Mixup of waveforms (AST: both clips mean-removed, lam ~ Beta(alpha, alpha), targets mixed
    with the same lam) with probability `mixup`, and SpecAugment draws: width ~ U{0..freqm},
    start ~ U{0..bins - width} (same in time with timem over num_frames)."""

    def __init__(self, clips: Clips, num_samples, mixup, mixup_alpha, freqm, timem, num_frames,
                 num_mel_bins):
        self.clips, self.num_samples = clips, num_samples
        self.mixup, self.alpha = mixup, mixup_alpha
        self.freqm, self.timem = freqm, timem
        self.num_frames, self.num_mel_bins = num_frames, num_mel_bins

    def random_map(self, i, rng: np.random.Generator):
        k = len(self.clips.classes)
        x, label = self.clips[i]
        x = _fit(x - x.mean(), self.num_samples)
        targets = np.eye(k, dtype=np.float32)[label]
        if self.mixup > 0 and rng.uniform() < self.mixup:
            y, label2 = self.clips[int(rng.integers(len(self.clips)))]
            y = _fit(y - y.mean(), self.num_samples)
            lam = rng.beta(self.alpha, self.alpha)
            x = lam * x + (1 - lam) * y
            targets = (lam * targets + (1 - lam) * np.eye(k, dtype=np.float32)[label2])
        fw = int(rng.integers(0, self.freqm + 1))
        fs = int(rng.integers(0, self.num_mel_bins - fw + 1))
        tw = int(rng.integers(0, self.timem + 1))
        ts = int(rng.integers(0, self.num_frames - tw + 1))
        return {"waveform": x.astype(np.float32), "label": np.int32(label),
                "targets": targets.astype(np.float32),
                "freq_mask": np.array([fs, fw], np.int32),
                "time_mask": np.array([ts, tw], np.int32),
                "id": np.int32(i)}


def clip_dataset(clips: Clips, split: str, *, seed: int = 0, num_samples: int,
                 mixup: float = 0.0, mixup_alpha: float = 10.0, freqm: int = 0, timem: int = 0,
                 num_frames: int, num_mel_bins: int) -> grain.MapDataset:
    """A grain dataset of fixed-length waveforms and augmentation draws for `front_end`.

    Examples: {"waveform": float32 [num_samples] (cropped, or zero-padded at the end),
    "label": int32 [] (the first clip's), "targets": float32 [K] (one-hot, or the mixup mixture),
    "freq_mask", "time_mask": int32 [2] (start, width), "id": int32 [] (the clip's index)}.
    "train": shuffled by seed, repeated forever, mixup and SpecAugment drawn per (seed, example,
    epoch); "eval": finite, in order, masks (0, 0), one-hot targets. num_frames / num_mel_bins
    are the fbank's (target_length, bins), the ranges of the mask draws."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if len(clips) == 0:
        raise ConfigError("clip_dataset: no clips")
    if num_samples < 1 or not 0 <= mixup <= 1 or mixup_alpha <= 0:
        raise ConfigError(f"clip_dataset: need num_samples >= 1 ({num_samples}), 0 <= mixup <= 1 "
                          f"({mixup}), mixup_alpha > 0 ({mixup_alpha})")
    if not (0 <= freqm <= num_mel_bins and 0 <= timem <= num_frames):
        raise ConfigError(f"clip_dataset: need 0 <= freqm ({freqm}) <= num_mel_bins "
                          f"({num_mel_bins}) and 0 <= timem ({timem}) <= num_frames ({num_frames})")
    ds = grain.MapDataset.source(_ClipIds(len(clips)))
    if split == "train":
        return ds.shuffle(seed=seed).repeat(None).random_map(
            _TrainClip(clips, num_samples, mixup, mixup_alpha, freqm, timem, num_frames,
                       num_mel_bins), seed=seed)
    return ds.map(_EvalClip(clips, num_samples))


# ----------------------------------------------------------------------------- pictures
# A perceptual dark-to-bright map (inferno-like anchors: black, purple, red, orange, pale yellow):
# lightness rises monotonically, so it reads correctly in grey too.
_COLOURS = np.array([[0, 0, 4], [66, 10, 104], [147, 38, 103], [221, 81, 58], [252, 165, 10],
                     [252, 255, 164]], np.float64)


def spectrogram_image(fbank) -> np.ndarray:
    """fbank [T, F] -> uint8 [2F, 2T, 3]: frequency up (bin 0 at the bottom), time to the right,
    min-max scaled per image, coloured, upscaled x2 (nearest) for TensorBoard."""
    fb = np.asarray(fbank, np.float64)
    if fb.ndim != 2:
        raise ValueError(f"spectrogram_image: need fbank [T, F], got shape {fb.shape}")
    img = fb.T[::-1]  # [F, T], last bin in row 0
    lo, hi = img.min(), img.max()
    v = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    pos = np.linspace(0.0, 1.0, len(_COLOURS))
    rgb = np.stack([np.interp(v, pos, _COLOURS[:, c]) for c in range(3)], -1)
    rgb = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- CLI
def _cli_clips(source: str, split: str, num: int, sample_rate: int, skip_bad: bool) -> Clips:
    if source == "synthetic":
        return synthetic_clips(split, num=num, sample_rate=sample_rate)
    if os.path.isfile(os.path.join(source, "meta", "esc50.csv")):
        return esc50(source, split, sample_rate=sample_rate, skip_bad=skip_bad)
    return wav_folder(source, split, sample_rate=sample_rate, skip_bad=skip_bad)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.audio",
                                description="Audio data tools for the AST family.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="fbank mean and std for normalize (AST get_norm_stats)")
    s.add_argument("--source", required=True,
                   help="'synthetic', an ESC-50 root (meta/esc50.csv) or a <class>/*.wav folder")
    s.add_argument("--split", default="train", choices=("train", "eval"))
    s.add_argument("--num", type=int, default=256, help="synthetic clips to use")
    s.add_argument("--sample_rate", type=int, default=16000)
    s.add_argument("--num_mel_bins", type=int, default=128)
    s.add_argument("--target_length", type=int, default=100)
    s.add_argument("--skip_bad", action="store_true",
                   help="leave out audio files that cannot be read (each named in a warning) "
                        "instead of stopping")
    a = p.parse_args(argv)
    try:
        clips = _cli_clips(a.source, a.split, a.num, a.sample_rate, a.skip_bad)
        mean, std = fbank_stats(clips, sample_rate=a.sample_rate, num_mel_bins=a.num_mel_bins,
                                target_length=a.target_length)
    except ConfigError as e:  # (AudioDataError is one: a file that cannot be read)
        unreadable = isinstance(e, BadExample) or "cannot be read" in str(e)
        hint = "\n(--skip_bad leaves unreadable files out)" if unreadable and not a.skip_bad else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    print(f"clips={len(clips)} mean={mean:.7g} std={std:.7g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
