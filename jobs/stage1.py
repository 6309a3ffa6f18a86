"""Stage 1: full fine-tuning of the LM on the run's instruction data (Ray Train + DeepSpeed)."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.cluster import init_ray
from blsp_ray.train import run_stage1


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    init_ray(cfg)
    result = run_stage1(cfg)
    print(f"stage1 exported to {result.export_dir}; final metrics {result.metrics}")


if __name__ == "__main__":
    main()
