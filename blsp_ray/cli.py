"""What every job entry point shares: ``--config`` + ``--set key=value`` overrides, logging, and the
loopback environment when the job starts its own Ray."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from blsp_ray.config import BlspRayConfig, load_config
from blsp_ray.io.storage import is_s3, read_text
from blsp_ray.runtime import loopback_env


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (configs/tiny.yaml, configs/blsp-7b.yaml, ..., or s3://)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. stage2.lr=1e-4")
    return parser


def load_job_config(args: argparse.Namespace) -> BlspRayConfig:
    """The job's config: a local file, or an s3:// one (the pipeline's run config of an S3 run,
    read with the endpoint the job's environment names, AWS_ENDPOINT_URL).

    A job with no cluster to join (no ``cluster.address``, not inside ``ray job submit``) starts a
    Ray of its own on 127.0.0.1: ``loopback_env()`` first (which may start this process again)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_s3(args.config):
        cfg = load_config(args.config, args.set)
    else:
        with tempfile.TemporaryDirectory(prefix="blsp-config-") as tmp:
            local = Path(tmp) / Path(args.config).name
            local.write_text(read_text(args.config))
            cfg = load_config(local, args.set)
    if cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        loopback_env()
    return cfg
