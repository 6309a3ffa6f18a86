"""Continuation labelling (the seed's ``continue_writing``): the stage-1 LM continues every ASR
transcript; labelled parquet shards go to the run's ``label/shards``. A rerun does only the
shards not yet committed."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.label import run_label


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--manifest", action="append", default=[], help="ASR manifest jsonl (local or s3://); repeatable")
    args = parser.parse_args()
    cfg = load_job_config(args)
    if args.manifest:
        cfg.label.manifests = args.manifest
    run_label(cfg)


if __name__ == "__main__":
    main()
