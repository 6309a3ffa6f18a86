"""The README's "Your own cluster" commands, read from the README and run line by line on this
machine (in a scratch copy of the repository root, ports swapped for free ones): the head
listens on loopback only, each stage appears in ``ray job list`` under its name, and stopping
the head leaves every other Ray cluster (this session's) running."""

import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
import ray

from blsp_ray.runtime import free_ports, start_local_cluster

REPO = Path(__file__).resolve().parents[1]


def readme_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    marker = text.index("<!-- own-cluster:")
    block = text[marker:].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return (mapped or address).is_loopback


def head_processes(port: int) -> list[psutil.Process]:
    state = json.loads(Path(f"/tmp/blsp-ray-head-{port}.json").read_text())
    roots = [p for p in psutil.process_iter(["cmdline"]) if state["temp_dir"] in " ".join(p.info["cmdline"] or [])]
    procs = set(roots)
    for p in roots:
        procs.update(p.children(recursive=True))
    return sorted(procs, key=lambda p: p.pid)


@pytest.mark.slow
def test_readme_own_cluster_commands(ray_cluster, tmp_path):
    lines = readme_block()
    assert lines[0].startswith(".venv/bin/blsp-ray local-cluster start") and "local-cluster stop" in lines[-1]
    gcs, dash = free_ports(2)
    lines = [re.sub(r"\b6390\b", str(gcs), re.sub(r"\b8265\b", str(dash), line)) for line in lines]
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    outputs = {}
    try:
        for line in lines:
            if "local-cluster stop" in line:
                listening = [c for c in psutil.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN and c.pid in {p.pid for p in head_processes(gcs)}]
                assert listening, "no listening sockets found for the head's processes"
                exposed = [f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})" for c in listening if not is_loopback(c.laddr.ip)]
                assert not exposed, f"head listens beyond loopback: {exposed}"
                pids = [p.pid for p in head_processes(gcs)]
            proc = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            outputs[line] = proc.stdout
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    finally:
        if Path(f"/tmp/blsp-ray-head-{gcs}.json").exists():
            subprocess.run([str(REPO / ".venv/bin/blsp-ray"), "local-cluster", "stop", "--port", str(gcs)], env=env)

    jobs = next(out for line, out in outputs.items() if line.startswith(".venv/bin/ray job list"))
    for stage in ("build_assets", "make_speech"):
        assert f"submission_id='blsp-{stage}-" in jobs and f"'blsp_stage': '{stage}'" in jobs, jobs
    assert jobs.count("status=<JobStatus.SUCCEEDED") == 2, jobs
    assert (tmp_path / "assets" / "tiny" / "lm").is_dir()  # relative paths meant the submitting directory
    assert (tmp_path / "data" / "speech" / "train.jsonl").exists()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert ray.cluster_resources().get("CPU", 0) > 0  # this session's cluster is still up


def test_a_failed_head_start_leaves_no_process_behind():
    """``ray start --head`` fails when its dashboard port is taken (as it was once when another
    process got the port between its choice and its use), after the GCS and its monitor are up:
    ``start_local_cluster`` raises, and ends what the failed start left running."""
    gcs, dash = free_ports(2)

    def processes_of_this_head() -> list[str]:  # every process of a head names its GCS port
        names = {f"--gcs_server_port={gcs}", f"--port={gcs}"}
        found = []
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            if any(a in names or a.endswith(f"127.0.0.1:{gcs}") for a in args):
                found.append(" ".join(args)[:200])
        return found

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", dash))
        taken.listen()
        with pytest.raises(RuntimeError, match="ray start --head failed"):
            start_local_cluster(num_cpus=1, port=gcs, dashboard_port=dash)
    assert processes_of_this_head() == []
