"""LibriSpeech / GigaSpeech / Common Voice in their released layouts -> ASR manifests of the run
(RunLayout.asr_manifests/<source>.jsonl), as a Ray Data job."""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.data.asr import SOURCES, configured_sources, prepare_asr


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--source", action="append", choices=SOURCES,
                        help="source to prepare (repeatable; default: every source whose data.<source>_dir is set)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    sources = args.source or configured_sources(cfg)
    if not sources:
        raise SystemExit("no ASR source configured: set data.librispeech_dir / gigaspeech_dir / commonvoice_dir")
    for source in sources:
        prepare_asr(cfg, source)


if __name__ == "__main__":
    main()
