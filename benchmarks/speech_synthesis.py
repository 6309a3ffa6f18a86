"""Speech-corpus synthesis rate (sentences/s, seconds of audio per second) for a config's `speech` section.

Baseline: one TTS process at a time (workers=1). Ours: ``speech.workers`` processes in parallel.
Both synthesise the same first N sentences of the plan into fresh temp dirs, so nothing is reused.

    python benchmarks/speech_synthesis.py [--config configs/mini.yaml] [--sentences 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from blsp_ray.config import load_config
from blsp_ray.demo.speech import synthesize_corpus
from blsp_ray.io.storage import read_jsonl


def rate(cfg, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-speech-") as out:
        started = time.perf_counter()
        manifests = synthesize_corpus(cfg.model_copy(update={"out_dir": out}), workers=workers)
        elapsed = time.perf_counter() - started
        rows = [r for path in manifests.values() for r in read_jsonl(path)]
    return len(rows) / elapsed, sum(r["duration"] for r in rows) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mini.yaml")
    parser.add_argument("--sentences", type=int, default=300)
    args = parser.parse_args()
    speech = load_config(args.config).speech
    if speech is None:
        raise SystemExit(f"{args.config} has no `speech` section")
    cfg = speech.model_copy(update={"num_sentences": args.sentences})
    base = rate(cfg, 1)
    ours = rate(cfg, cfg.workers)
    print(f"{args.sentences} sentences, voices {cfg.train_voices + cfg.heldout_voices}")
    print(f"baseline (1 worker):   {base[0]:6.1f} sentences/s  {base[1]:6.1f} s audio/s")
    print(f"ours ({cfg.workers} workers):     {ours[0]:6.1f} sentences/s  {ours[1]:6.1f} s audio/s  ({ours[0] / base[0]:.2f}x)")


if __name__ == "__main__":
    main()
