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
import subprocess
from pathlib import Path

import psutil
import pytest
import ray

from blsp_ray.runtime import free_ports

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
