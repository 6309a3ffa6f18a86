"""Offline preprocessing (Ray Data): labelled rows -> stage-2 parquet shards (waveform + token ids)
under RunLayout.preprocessed; reruns skip finished shards."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.data.preprocess import preprocess


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--input", action="append", help="jsonl / parquet file or dir (default: data.preprocess_inputs, else the label shards)")
    parser.add_argument("--output", help="shard directory (default: data.preprocess_output, else RunLayout.preprocessed)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    preprocess(cfg, args.input, args.output)


if __name__ == "__main__":
    main()
