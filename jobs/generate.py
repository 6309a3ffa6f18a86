"""Speech generation with a BLSP checkpoint (the seed's generate.py) as a Ray Data batch job.

    python -m jobs.generate --input_file test.jsonl --output_file out.jsonl --blsp_model runs/x/stage2/model \
        --instruction "Please translate the following audio into German text." [--config configs/tiny.yaml]

Rows come back in input order with ``response`` added (``error`` for a row that could not be used).
"""

import argparse

from blsp_ray.cli import load_job_config
from blsp_ray.config import config_from_dict
from blsp_ray.inference import run_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (cluster, generate section); default: local CPU settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--input_file", required=True, help="jsonl rows {\"audio\": path, ...} (local or s3://)")
    p.add_argument("--output_file", required=True)
    p.add_argument("--blsp_model", required=True, help="BLSP checkpoint directory (adapter-only or full; local or s3://)")
    p.add_argument("--instruction", default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    args = p.parse_args()
    if args.config:
        cfg = load_job_config(args)
    else:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = config_from_dict({"model": {"lm_path": "", "whisper_path": ""}})  # paths come from --blsp_model
    for key in ("instruction", "max_new_tokens", "temperature", "top_p", "batch_size", "engine"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg.generate, key, value)
    run_generate(cfg, args.input_file, args.output_file, args.blsp_model)


if __name__ == "__main__":
    main()
