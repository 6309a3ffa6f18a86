"""Make the demo corpus: sentences spoken into 16 kHz wav files with train/held-out manifests, and
(speech.instruction_rows > 0) Alpaca-shaped instruction data beside them as alpaca_data.json."""

from __future__ import annotations

import json
from pathlib import Path
from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.demo.corpus import make_instructions
from blsp_ray.demo.speech import synthesize_corpus
from blsp_ray.io.storage import atomic_file


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    if cfg.speech is None:
        raise SystemExit("config has no `speech` section: nothing to synthesize")
    for split, path in synthesize_corpus(cfg.speech).items():
        print(f"{split}: {path}")
    if cfg.speech.instruction_rows:
        path = Path(cfg.speech.out_dir) / "alpaca_data.json"
        with atomic_file(path) as f:
            json.dump(make_instructions(cfg.speech.instruction_rows, cfg.speech.seed), f, indent=1)
        print(f"instructions: {path}")
