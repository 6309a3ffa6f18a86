"""A pipeline stage for tests: records each run, and blocks while a 'hold' file exists (to be stopped)."""

import sys
import time
from pathlib import Path

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.io.layout import RunLayout

if __name__ == "__main__":
    cfg = load_job_config(job_parser(__doc__).parse_args())
    out = Path(RunLayout.of(cfg).stage("probe"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.log", "a") as f:
        f.write("run\n")
    while (out / "hold").exists():
        time.sleep(0.2)
    sys.exit(0)
