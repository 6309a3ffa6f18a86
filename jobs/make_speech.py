"""Speak the config's sentences with espeak-ng into 16 kHz wav files and train/held-out manifests."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.speech import synthesize_corpus


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    if cfg.speech is None:
        raise SystemExit("config has no `speech` section: nothing to synthesize")
    for split, path in synthesize_corpus(cfg.speech).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
