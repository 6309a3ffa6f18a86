"""What every job entry point shares: ``--config`` + ``--set key=value`` overrides, logging."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from blsp_ray.config import BlspRayConfig, load_config


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (configs/tiny.yaml, configs/blsp-7b.yaml, ..., or s3://)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. stage2.lr=1e-4")
    return parser


def load_job_config(args: argparse.Namespace) -> BlspRayConfig:
    """The job's config: a local file, or an s3:// one (the pipeline's run config of an S3 run,
    read with the endpoint the job's environment names, AWS_ENDPOINT_URL)."""
    from blsp_ray.io.storage import is_s3, read_text

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_s3(args.config):
        return load_config(args.config, args.set)
    with tempfile.TemporaryDirectory(prefix="blsp-config-") as tmp:
        local = Path(tmp) / Path(args.config).name
        local.write_text(read_text(args.config))
        return load_config(local, args.set)
