"""Speech made on the machine: espeak-ng and flite speak sentences into 16 kHz mono wav + jsonl manifests.

Training and held-out sets differ in sentences *and* voices, so held-out numbers measure
generalisation to unseen speakers, not memorised audio.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

from blsp_ray.model.audio import SAMPLE_RATE, AudioError, decode_audio
from blsp_ray.config import SpeechSynthConfig, parse_voice
from blsp_ray.demo.corpus import load_sentences
from blsp_ray.io.storage import atomic_file, write_jsonl

log = logging.getLogger(__name__)
FLITE_NORMAL_WPM = 175  # flite's duration_stretch 1.0, taken as espeak-ng's default rate


def tts_command(text: str, voice: str, speed: int, pitch: int) -> list[str]:
    """The command line that writes a wav of ``text`` to stdout (text passed as one argv item, never a shell)."""
    engine, name = parse_voice(voice)
    if shutil.which(engine) is None:
        raise RuntimeError(f"{engine} is not installed (Debian: apt-get install {engine})")
    if engine == "espeak-ng":
        return ["espeak-ng", "-v", name, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    stretch = FLITE_NORMAL_WPM / speed
    return ["flite", "-voice", name, "--setf", f"duration_stretch={stretch:.3f}", "-t", text, "-o", "/dev/stdout"]


@functools.lru_cache(maxsize=None)
def installed_voices(engine: str) -> frozenset[str]:
    """Voice names ``engine`` knows (espeak-ng: language codes and voice names; variants as ``+name``).

    Both engines silently fall back to a default voice on an unknown name, so names are checked first.
    """
    if shutil.which(engine) is None:
        raise RuntimeError(f"{engine} is not installed (Debian: apt-get install {engine})")
    if engine == "flite":
        out = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
        return frozenset(out.split(":", 1)[1].split())
    names = set()
    for line in subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]:
        cols = line.split()  # Pty Language Age/Gender VoiceName File (OtherLanguage priority)...
        if len(cols) >= 5 and not cols[4].startswith("mb/"):  # mbrola voices need the mbrola package
            names.update({cols[1], cols[3], cols[4], cols[4].rsplit("/", 1)[-1]})
            names.update(c.lstrip("(") for c in cols[5::2])
    variants = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    for line in variants.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5:
            names.update({f"+{cols[3]}", f"+{cols[4].rsplit('/', 1)[-1]}"})
    return frozenset(names)


def check_voices(voices: list[str]) -> None:
    """Raise ValueError naming every voice (or espeak-ng variant) its engine does not have."""
    unknown = []
    for voice in voices:
        engine, name = parse_voice(voice)
        known = installed_voices(engine)
        base, _, variant = name.partition("+")
        if base not in known or (variant and f"+{variant}" not in known):
            unknown.append(voice)
    if unknown:
        raise ValueError(f"unknown TTS voices {unknown} (list them with `espeak-ng --voices`, "
                         "`espeak-ng --voices=variant`, `flite -lv`)")


def speak_wav(text: str, voice: str, speed: int, pitch: int, out_path: Path) -> float:
    """Speak ``text`` into a 16 kHz mono 16-bit wav at ``out_path``; returns its duration (s)."""
    proc = subprocess.run(tts_command(text, voice, speed, pitch), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{voice} failed on {text!r}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    samples = decode_audio(io.BytesIO(proc.stdout), f"{voice} speaking {text!r}")  # espeak-ng 22.05 kHz -> 16 kHz
    with atomic_file(out_path, "wb") as f:
        sf.write(f, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return len(samples) / SAMPLE_RATE


def _wav_name(split: str, index: int, text: str, voice: str, speed: int, pitch: int) -> str:
    # The name carries a digest of what is spoken and how, so a rerun reuses a wav only when it
    # is the same utterance (a changed config never picks up stale audio).
    digest = hashlib.sha1(f"{text}\0{voice}\0{speed}\0{pitch}".encode()).hexdigest()[:10]
    return f"{split}-{index:05d}-{digest}.wav"


def plan_corpus(cfg: SpeechSynthConfig) -> list[dict]:
    """Which sentence is spoken by which voice, speed and pitch, in which split (deterministic in ``cfg.seed``)."""
    sentences = load_sentences(cfg)
    rng = random.Random(cfg.seed)
    pitch_rng = random.Random(cfg.seed + 1)  # its own stream: adding pitches leaves voices/speeds as they were
    n_heldout = round(len(sentences) * cfg.heldout_fraction) if cfg.heldout_voices else 0
    plan = []
    for i, text in enumerate(sentences):
        split = "heldout" if i < n_heldout else "train"
        voices = cfg.heldout_voices if split == "heldout" else cfg.train_voices
        k = 1 if split == "heldout" else cfg.train_voices_per_sentence
        for voice in [rng.choice(voices)] if k == 1 else rng.sample(voices, k):
            speed = rng.choice(cfg.speeds)
            pitch = pitch_rng.choice(cfg.pitches) if len(cfg.pitches) > 1 else cfg.pitches[0]
            plan.append({"split": split, "text": text, "voice": voice, "speed": speed, "pitch": pitch,
                         "wav": Path(cfg.out_dir) / "wav" / _wav_name(split, i, text, voice, speed, pitch)})
    return plan


def synthesize_corpus(cfg: SpeechSynthConfig, workers: int | None = None) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` manifests ({"audio","text","duration",...}) under out_dir.

    Each sentence is spoken once by a voice of its split at a speed (and pitch); existing wavs are
    reused. A sentence a voice cannot speak is logged and left out, not fatal.
    """
    out = Path(cfg.out_dir)
    check_voices(cfg.train_voices + cfg.heldout_voices)
    plan = plan_corpus(cfg)
    started = time.perf_counter()

    def run(job: dict) -> dict | None:
        wav = job["wav"]
        try:
            if wav.exists():
                duration = sf.info(str(wav)).duration
            else:
                duration = speak_wav(job["text"], job["voice"], job["speed"], job["pitch"], wav)
        except (RuntimeError, AudioError) as err:
            log.warning("skipping sentence: %s", err)
            return None
        engine, _ = parse_voice(job["voice"])
        return {"audio": str(wav), "text": job["text"], "duration": round(duration, 4), "voice": job["voice"],
                "engine": engine, "speed": job["speed"], "pitch": job["pitch"] if engine == "espeak-ng" else None,
                "split": job["split"], "source": f"tts-{cfg.text_source}"}

    # Threads suffice: the time is in the TTS processes, which run outside the GIL.
    with ThreadPoolExecutor(workers or cfg.workers) as pool:
        results = list(pool.map(run, plan))
    skipped = sum(r is None for r in results)
    if skipped > len(plan) // 10:
        raise RuntimeError(f"speech synthesis failed for {skipped} of {len(plan)} sentences (see the warnings)")
    manifests = {}
    for split in ("train", "heldout"):
        rows = [r for r in results if r is not None and r["split"] == split]
        if rows:
            manifests[split] = out / f"{split}.jsonl"
            write_jsonl(manifests[split], rows)
    elapsed = time.perf_counter() - started
    log.info("speech corpus in %s: %s, %d skipped, %.1f s (%.1f sentences/s)", out,
             {k: sum(1 for r in results if r and r["split"] == k) for k in manifests}, skipped, elapsed,
             len(plan) / max(elapsed, 1e-9))
    return manifests
