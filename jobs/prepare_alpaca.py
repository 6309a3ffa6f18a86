"""Alpaca instruction data (data.alpaca_json) -> the stage-1 jsonl of the run (RunLayout.stage1_data)."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.data.alpaca import prepare_alpaca
from blsp_ray.layout import RunLayout


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--output", help="jsonl to write (default: the run's stage-1 data)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    if not cfg.data.alpaca_json:
        raise SystemExit("config has no data.alpaca_json: nothing to prepare")
    prepare_alpaca(cfg.data.alpaca_json, args.output or RunLayout.of(cfg).stage1_data, cfg.cluster.s3)


if __name__ == "__main__":
    main()
