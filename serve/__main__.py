"""Deploy the chat service from our config: ``python -m serve --config configs/tiny.yaml [--checkpoint DIR]``.

Connects to ``cluster.address`` (or starts a local Ray head on 127.0.0.1 when it is null), starts
Serve's proxy on ``serve.host:serve.port``, deploys, and keeps serving until interrupted
(``--detach`` returns at once and leaves the application running on the cluster).
"""

from __future__ import annotations

import time

import ray
from ray import serve

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.runtime import start_local_cluster
from serve.app import deploy


def main() -> None:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="BLSP checkpoint dir (default: serve.checkpoint, then the run's stage-2 model)")
    parser.add_argument("--detach", action="store_true", help="deploy and return (needs cluster.address)")
    args = parser.parse_args()
    cfg = load_job_config(args)  # without cluster.address: the loopback environment the local cluster needs
    if cfg.cluster.address is None and args.detach:
        parser.error("--detach needs cluster.address: a local cluster ends with this process")
    local = None
    try:
        if cfg.cluster.address is None:
            local = start_local_cluster()
        ray.init(address=local.address if local else cfg.cluster.address, runtime_env={"env_vars": dict(cfg.cluster.env_vars)})
        url = deploy(cfg, args.checkpoint)
        print(f"BLSP chat at {url}/ (API {url}/v1/chat/completions)", flush=True)
        if args.detach:
            return
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if not args.detach and ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        if local is not None:
            local.stop()


if __name__ == "__main__":
    main()
