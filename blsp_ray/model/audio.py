"""Reading speech: one function every stage uses, with a named reason for every failure."""

from __future__ import annotations

import math
import os
import re
from collections import Counter

import numpy as np
import soundfile as sf
import soxr

from blsp_ray.drops import AUDIO_REASONS, DropReason, RowDropped

SAMPLE_RATE = 16000
# Whisper's STFT (400-sample window, centred) reflect-pads 200 samples on each side: a clip needs
# more than that to have features at all. Every stage drops shorter clips as ``too_short``.
MIN_SAMPLES = 201
# An ``audio`` value may name a segment of a longer file: ``path:start_frame:num_frames``.
_SEGMENT = re.compile(r"^(?P<path>.+):(?P<start>\d+):(?P<frames>\d+)$")


class AudioError(RowDropped):
    """A clip that cannot be used: a drop whose reason is one of the audio reasons."""

    def __init__(self, reason: DropReason | str, detail: str):
        super().__init__(reason, detail)
        if self.reason not in AUDIO_REASONS:
            raise TypeError(f"AudioError is for audio problems, not {self.reason!r}: raise RowDropped")


def probe(path: str, label: str):
    """``soundfile.info(path)``: the header of an audio file; AudioError (missing_file / undecodable / empty) if unusable."""
    if not os.path.exists(path):
        raise AudioError(DropReason.MISSING_FILE, label)
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError(DropReason.UNDECODABLE, f"{label}: {err}") from None
    if info.frames <= 0:
        raise AudioError(DropReason.EMPTY, label)
    return info


def parse_audio_spec(spec: str) -> tuple[str, int, int]:
    """``path`` or ``path:start:frames`` -> (path, start, frames); frames -1 means to the end."""
    m = _SEGMENT.match(spec)
    if m:
        return m["path"], int(m["start"]), int(m["frames"])
    return spec, 0, -1


def to_mono_16k(samples: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[T] or [T, C] float -> [T'] float32 mono at ``target_rate``."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    samples = samples.astype(np.float32, copy=False)
    if sample_rate != target_rate:
        samples = soxr.resample(samples, sample_rate, target_rate).astype(np.float32, copy=False)
    return samples


def decode_audio(source, label: str, start: int = 0, frames: int = -1, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a path or file-like object into mono float32 at ``target_rate``; raise AudioError."""
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise AudioError(DropReason.MISSING_FILE, label)  # soundfile reports it as a generic open error
    try:
        samples, rate = sf.read(source, start=start, frames=frames, dtype="float32", always_2d=False)
    except FileNotFoundError:
        raise AudioError(DropReason.MISSING_FILE, label) from None
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        # soundfile raises for empty, truncated and non-audio files alike.
        raise AudioError(DropReason.UNDECODABLE, f"{label}: {err}") from None
    if samples.size == 0:
        raise AudioError(DropReason.EMPTY, label)
    if not np.all(np.isfinite(samples)):
        raise AudioError(DropReason.NON_FINITE, f"{label}: NaN or inf samples")
    return to_mono_16k(samples, rate, target_rate)


def load_audio(spec: str, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read ``path`` or ``path:start:frames`` into mono float32 at ``target_rate``."""
    path, start, frames = parse_audio_spec(spec)
    return decode_audio(path, spec, start, frames, target_rate)


def duration_s(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    return len(samples) / rate


def check_duration(samples: np.ndarray, label: str, min_s: float, max_s: float, rate: int = SAMPLE_RATE) -> None:
    """The one duration rule: at least ``min_s`` and ``MIN_SAMPLES`` (Whisper's floor), below ``max_s``."""
    d = duration_s(samples, rate)
    if len(samples) < MIN_SAMPLES:
        raise AudioError(DropReason.TOO_SHORT, f"{label}: {len(samples)} samples, Whisper features need at least {MIN_SAMPLES}")
    if d < min_s or math.isclose(d, 0.0):
        raise AudioError(DropReason.TOO_SHORT, f"{label}: {d:.3f}s < {min_s}s")
    if d >= max_s:
        raise AudioError(DropReason.TOO_LONG, f"{label}: {d:.2f}s >= {max_s}s")


def read_clip(spec: str, min_s: float, max_s: float, rate: int = SAMPLE_RATE, converted: Counter | None = None) -> np.ndarray:
    """Decode ``path`` or ``path:start:frames`` to mono float32 at ``rate``, validated; raise AudioError.

    Beyond ``decode_audio``'s reasons: ``truncated`` (the header reads, the data is shorter than it
    declares or unreadable part-way). Over-long clips are refused from the header, before decoding.
    ``converted`` counts what was done to a kept clip (``mixed_to_mono``, ``resampled_from_<rate>``).
    """
    path, start, frames = parse_audio_spec(spec)
    info = probe(path, spec)
    available = info.frames - start
    wanted = frames if frames >= 0 else available
    if wanted <= 0:
        raise AudioError(DropReason.EMPTY, f"{spec}: no frames to read (file has {info.frames})")
    if wanted > available:
        raise AudioError(DropReason.TRUNCATED, f"{spec}: wants frames up to {start + wanted}, file has {info.frames}")
    if wanted / info.samplerate >= max_s:
        raise AudioError(DropReason.TOO_LONG, f"{spec}: {wanted / info.samplerate:.2f}s >= {max_s}s")
    try:
        samples = decode_audio(path, spec, start, frames, rate)
    except AudioError as err:
        if err.reason != DropReason.UNDECODABLE:
            raise
        raise AudioError(DropReason.TRUNCATED, f"{spec}: header reads but data does not ({err})") from None
    expected = wanted * rate / info.samplerate
    if len(samples) < 0.99 * expected - 1:
        raise AudioError(DropReason.TRUNCATED, f"{spec}: decoded {len(samples)} samples, header promises {expected:.0f}")
    check_duration(samples, spec, min_s, max_s, rate)
    if converted is not None:
        if info.channels > 1:
            converted["mixed_to_mono"] += 1
        if info.samplerate != rate:
            converted[f"resampled_from_{info.samplerate}"] += 1
    return samples
