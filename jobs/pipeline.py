"""Run the whole BLSP pipeline as Ray jobs (the README's first command runs this on configs/mini.yaml)."""

import signal
import sys

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.pipeline import StageFailed, run_pipeline


def main() -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args())
    # SIGTERM unwinds like Ctrl-C, so a local cluster started by the driver is stopped, not leaked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        ran = run_pipeline(cfg)
    except StageFailed as err:
        print(err, file=sys.stderr)
        raise SystemExit(1)
    print(f"pipeline complete; stages run now: {', '.join(ran) or 'none (all were complete)'}")


if __name__ == "__main__":
    main()
