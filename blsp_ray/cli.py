"""What every job entry point shares: ``--config`` + ``--set key=value`` overrides, logging."""

from __future__ import annotations

import argparse
import logging

from blsp_ray.config import BlspRayConfig, load_config


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (configs/tiny.yaml, configs/blsp-7b.yaml, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. stage2.lr=1e-4")
    return parser


def load_job_config(args: argparse.Namespace) -> BlspRayConfig:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_config(args.config, args.set)
