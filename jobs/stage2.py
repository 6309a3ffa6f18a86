"""Stage 2: train the speech adapter (Whisper encoder and LM frozen) on the run's preprocessed shards."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.cluster import init_ray
from blsp_ray.train import run_stage2


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    init_ray(cfg)
    result = run_stage2(cfg)
    print(f"stage2 exported to {result.export_dir}; final metrics {result.metrics}")


if __name__ == "__main__":
    main()
