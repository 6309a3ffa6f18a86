"""Reading speech: one function every stage uses, with a named reason for every failure."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
# An ``audio`` value may name a segment of a longer file: ``path:start_frame:num_frames``.
_SEGMENT = re.compile(r"^(?P<path>.+):(?P<start>\d+):(?P<frames>\d+)$")


class AudioError(ValueError):
    """A clip that cannot be used; ``reason`` is a short stable code for drop counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


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
        raise AudioError("missing_file", label)  # soundfile reports it as a generic open error
    try:
        samples, rate = sf.read(source, start=start, frames=frames, dtype="float32", always_2d=False)
    except FileNotFoundError:
        raise AudioError("missing_file", label) from None
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        # soundfile raises for empty, truncated and non-audio files alike.
        raise AudioError("undecodable", f"{label}: {err}") from None
    if samples.size == 0:
        raise AudioError("empty", label)
    if not np.all(np.isfinite(samples)):
        raise AudioError("non_finite", f"{label}: NaN or inf samples")
    return to_mono_16k(samples, rate, target_rate)


def load_audio(spec: str, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read ``path`` or ``path:start:frames`` into mono float32 at ``target_rate``."""
    path, start, frames = parse_audio_spec(spec)
    return decode_audio(path, spec, start, frames, target_rate)


def duration_s(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    return len(samples) / rate


def check_duration(samples: np.ndarray, label: str, min_s: float, max_s: float, rate: int = SAMPLE_RATE) -> None:
    d = duration_s(samples, rate)
    if d < min_s or math.isclose(d, 0.0):
        raise AudioError("too_short", f"{label}: {d:.3f}s < {min_s}s")
    if d >= max_s:
        raise AudioError("too_long", f"{label}: {d:.2f}s >= {max_s}s")
