"""Speech made on the machine: espeak-ng speaks sentences into 16 kHz mono wav + a jsonl manifest.

Training and held-out sets differ in sentences *and* voices, so held-out numbers measure
generalisation to unseen speakers, not memorised audio.
"""

from __future__ import annotations

import io
import logging
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

from blsp_ray.audio import SAMPLE_RATE, decode_audio
from blsp_ray.config import SpeechSynthConfig
from blsp_ray.corpus import make_sentences
from blsp_ray.storage import atomic_file, write_jsonl

log = logging.getLogger(__name__)


def espeak_wav(text: str, voice: str, speed: int, out_path: Path) -> float:
    """Speak ``text`` into a 16 kHz mono 16-bit wav at ``out_path``; returns its duration (s)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    proc = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    )
    samples = decode_audio(io.BytesIO(proc.stdout), f"espeak-ng {voice}")  # 22.05 kHz -> 16 kHz mono
    with atomic_file(out_path, "wb") as f:
        sf.write(f, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return len(samples) / SAMPLE_RATE


def synthesize_corpus(cfg: SpeechSynthConfig, workers: int = 2) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` manifests ({"audio","text","duration",...}) under out_dir.

    Each sentence is spoken once by a voice of its split at a speed; existing wavs are reused.
    """
    out = Path(cfg.out_dir)
    sentences = make_sentences(cfg.num_sentences, cfg.seed)
    rng = random.Random(cfg.seed)
    n_heldout = round(len(sentences) * cfg.heldout_fraction) if cfg.heldout_voices else 0
    jobs = []
    for i, text in enumerate(sentences):
        split = "heldout" if i < n_heldout else "train"
        voice = rng.choice(cfg.heldout_voices if split == "heldout" else cfg.train_voices)
        speed = rng.choice(cfg.speeds)
        wav = out / "wav" / f"{split}-{i:05d}.wav"
        jobs.append((split, text, voice, speed, wav))

    def run(job):
        split, text, voice, speed, wav = job
        duration = sf.info(str(wav)).duration if wav.exists() else espeak_wav(text, voice, speed, wav)
        return split, {"audio": str(wav), "text": text, "duration": round(duration, 4), "voice": voice, "speed": speed}

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, jobs))
    manifests = {}
    for split in ("train", "heldout"):
        rows = [r for s, r in results if s == split]
        if rows:
            manifests[split] = out / f"{split}.jsonl"
            write_jsonl(manifests[split], rows)
    log.info("speech corpus in %s: %s", out, {k: sum(1 for s, _ in results if s == k) for k in manifests})
    return manifests
