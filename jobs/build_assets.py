"""Build the small offline models of the config's ``assets`` section (no hub downloads)."""

from blsp_ray.assets import build_tiny_assets
from blsp_ray.cli import job_parser, load_job_config


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    if cfg.assets is None:
        raise SystemExit("config has no `assets` section: nothing to build")
    print(f"assets ready in {build_tiny_assets(cfg.assets)}")


if __name__ == "__main__":
    main()
