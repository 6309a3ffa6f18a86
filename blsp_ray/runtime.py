"""Connecting to Ray: a local cluster on 127.0.0.1 (the embedded default and the tests), started and
stopped cleanly, and ``init_ray`` for a job's driver.

``ray start --head`` with every port chosen free and every listener on loopback, so several
clusters can live on one machine and none is reachable from outside. ``stop()`` ends only this
cluster's processes (``ray stop`` would end every cluster on the machine). A process that drives
such a cluster itself (``ray.init`` on its address) calls ``loopback_env()`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
from ray.job_submission import JobStatus, JobSubmissionClient

from blsp_ray.io.storage import s3_env

log = logging.getLogger(__name__)

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray advertises the machine's non-loopback address
# even with --node-ip-address, and rewrites 127.0.0.1 to it when connecting (a driver then waits
# for a raylet that is not there). RAY_AUTH_MODE: once any local ray.init() has written
# ~/.ray/auth_token, `ray start` turns token auth on by itself while drivers given an explicit
# address do not send the token; the cluster listens on loopback only, so auth stays off and both
# sides agree. Never set on a real cluster's nodes: they must advertise their own addresses.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def loopback_env() -> None:
    """Make this process a driver of a loopback cluster: ``LOOPBACK_ENV`` in its environment.

    Ray reads it once, when first imported, so a process that has imported Ray already is started
    again with it (same command line, same pid). Entry points call it first in ``main()``, before
    doing anything, and only when they drive a local cluster.
    """
    if all(os.environ.get(k) == v for k, v in LOOPBACK_ENV.items()):
        return
    os.environ.update(LOOPBACK_ENV)
    if "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports handed out on bind(0) (Linux default 32768-60999)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, outside the kernel's ephemeral range.

    Ray's own components (raylet, object manager, agents, metrics) and every other program bind
    port 0 and get ephemeral ports, so a port taken from that range can be taken again before the
    process it is for binds it (a dashboard port lost that way failed ``ray start``). Ports between
    Ray's default worker ports (10002-19999) and the ephemeral range are given to nobody else."""
    low, high = _ephemeral_range()
    candidates = range(20000, low) if low - 20000 >= 1000 else range(high + 1, 65536)
    picked: list[int] = []
    rng = random.Random()
    for _ in range(100 * n):
        port = rng.choice(candidates)
        if port in picked:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        picked.append(port)
        if len(picked) == n:
            return picked
    raise RuntimeError(f"no {n} free ports on 127.0.0.1 in {candidates.start}-{candidates.stop - 1}")


def free_port() -> int:
    return free_ports(1)[0]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@dataclass
class LocalRayCluster:
    address: str  # GCS address, for ray.init / ray start --address
    dashboard_url: str  # also the job-submission API
    temp_dir: Path  # every process of the cluster has it on its command line (nodes that join take it too)

    def stop(self) -> None:
        """End this cluster's processes (and their children) and remove its files."""
        dirs = [str(self.temp_dir)]
        # Most of the cluster's processes name its temp dir; Ray's client-server proxy names only the
        # GCS address (and outlives the head unless ended here). Whole arguments, so port 6379 is not 63790.
        address_args = {f"--address={self.address}", f"--gcs-address={self.address}"}
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            ours = any(d in a for a in args for d in dirs) or any(a in address_args for a in args)
            if ours and p.pid != os.getpid():
                roots.append(p)
        procs = set(roots)
        for p in roots:
            try:
                procs.update(p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _run(cmd: list[str], timeout_s: float = 180) -> None:
    env = {**os.environ, **LOOPBACK_ENV}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{' '.join(cmd[:5])[:200]} did not finish in {timeout_s}s:\n{err.stderr or ''}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def start_local_cluster(num_cpus: int | None = None, resources: str | None = None, port: int | None = None,
                        dashboard_port: int | None = None) -> LocalRayCluster:
    """Start a Ray head on 127.0.0.1 with the dashboard (job API) on; ports free-chosen unless given."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    gcs, dash, client, agent = free_ports(4)  # distinct: chosen one by one, two could coincide
    port, dash = port or gcs, dashboard_port or dash
    cmd = [
        _ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if resources:
        cmd.append(f"--resources={resources}")
    t0 = time.time()
    cluster = LocalRayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir)
    try:
        _run(cmd)
    except BaseException:
        cluster.stop()  # what started before the failure (GCS, dashboard, monitor) would outlive it
        raise
    log.info("local Ray cluster at %s (dashboard %s) in %.1fs", cluster.address, cluster.dashboard_url, time.time() - t0)
    return cluster


def submit_stage(client: JobSubmissionClient, stage: str, command: list[str], env_vars: dict[str, str],
                 cwd: str | None = None) -> str:
    """Submit ``command`` (this environment's python, ``-m jobs.<stage>``, its args) as a Ray job
    named for the stage: id ``blsp-<stage>-<time>-<random>``, ``metadata.blsp_stage``. ``cwd``: the
    directory it starts in on the head (default: the job's own)."""
    entrypoint = shlex.join(command)
    if cwd is not None:
        entrypoint = f"cd {shlex.quote(cwd)} && {entrypoint}"
    return client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"env_vars": dict(env_vars)},
        metadata={"blsp_stage": stage},
        submission_id=f"blsp-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
    )


def follow_job(client: JobSubmissionClient, job_id: str, poll_s: float = 0.5) -> JobStatus:
    """Stream a job's logs to stdout until it ends; its final status.

    Ray's log tail closes seconds after the job has ended (its job manager and its file tail each
    sleep a second between reads before they believe the job is over: 5 s for a job that ran 1 s), so
    the status is polled beside it; once the job is terminal the tail is dropped and the rest of the
    log is read whole (the tail's chunks are the log's text in order, so what was printed is a prefix).
    """

    async def follow() -> JobStatus:
        printed = 0

        async def tail() -> None:
            nonlocal printed
            async for lines in client.tail_job_logs(job_id):
                sys.stdout.write(lines)
                sys.stdout.flush()
                printed += len(lines)

        tailing = asyncio.create_task(tail())
        status = await asyncio.to_thread(client.get_job_status, job_id)
        while not status.is_terminal():
            await asyncio.sleep(poll_s)
            status = await asyncio.to_thread(client.get_job_status, job_id)
        if not tailing.done():
            tailing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tailing
        elif tailing.exception() is not None:
            print(f"(log tail of {job_id} failed: {tailing.exception()!r}; the rest of its log follows)", flush=True)
        rest = (await asyncio.to_thread(client.get_job_logs, job_id))[printed:]
        sys.stdout.write(rest)
        sys.stdout.flush()
        return status

    return asyncio.run(follow())


def job_env(cfg) -> dict[str, str]:
    """Environment of every job and its workers: ``cluster.env_vars`` + the S3 endpoint of the config."""
    return {**cfg.cluster.env_vars, **s3_env(cfg.cluster.s3)}


def init_ray(cfg) -> None:
    """Connect this driver to its cluster: inside ``ray job submit`` the job's own (RAY_ADDRESS, whose
    runtime env the job already carries), else ``cluster.address`` with ``job_env``; with neither, a
    local Ray for this process."""
    if ray.is_initialized():
        return
    # This process reads s3:// too (Ray Data plans its reads here).
    for key, value in s3_env(cfg.cluster.s3).items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # a job's runtime env is set by the job; repeating it here is a conflict error
    elif cfg.cluster.address:
        # The config names the job API (http://head:8265) for the driver; a process on a node joins with "auto".
        address = "auto" if cfg.cluster.address.startswith("http") else cfg.cluster.address
        ray.init(address=address, runtime_env={"env_vars": job_env(cfg)})
    else:
        ray.init(include_dashboard=False)
