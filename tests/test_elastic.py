"""Elastic scale-up: a labelling job's engine pool grows onto a node that joins mid-job.

The test's own local cluster (it adds a node, so not the session's): a head for the job's driver
and the read tasks, one worker node with a ``labeller`` resource, and a second such node started
(``ray start --address ...``) while the job runs. Each engine replica asks for ``labeller: 1``, so
the pool's second replica can only run on the new node: Ray Data's autoscaling actor pool
(min 1, max 2) asks for it as soon as its one replica is busy, and it starts when the node joins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from blsp_ray.config import config_from_dict
from blsp_ray.io.layout import RunLayout
from blsp_ray.runtime import LOOPBACK_ENV, LocalRayCluster, free_port, start_local_cluster
from blsp_ray.stages.label import ROW_ID, stats_dir

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while rain fell over quiet hills and the river ran past old stone walls".split()
ROWS = 1600
ENGINE = "ContinuationLabeller"

# Ray has no public way to join a second node to a cluster on 127.0.0.1: with the loopback env's
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 `ray start --address` refuses to start a joining node, and
# with =1 it rewrites the head's 127.0.0.1 to the machine's own address, where nothing listens. So
# the joining node runs `ray start` with =1 and Ray's localhost resolution patched to keep loopback
# addresses (a private function of Ray: only this test, which needs several nodes on one machine).
_JOIN_ON_LOOPBACK = (
    "import sys; import ray._private.services as services; "
    "services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def _join_node(cluster: LocalRayCluster, num_cpus: int, resources: str) -> None:
    """Another raylet (same machine, its own resources) joins ``cluster``: a node joining mid-job.
    It takes the head's temp dir, so ``cluster.stop()`` ends its processes too."""
    cmd = [sys.executable, "-c", _JOIN_ON_LOOPBACK, "start", f"--address={cluster.address}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}", f"--resources={resources}"]
    env = {**os.environ, **LOOPBACK_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"joining node failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _engine_actors(address: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=address, detail=True, limit=10000, raise_on_missing_output=False)
            if ENGINE in (a.repr_name or "") or ENGINE in a.class_name]


def _wait(predicate, timeout: float, what: str, job=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None:
            client, job_id = job
            status = client.get_job_status(job_id)
            if status.is_terminal():
                raise AssertionError(f"job {status.value} while waiting for {what}:\n{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_labelling_pool_grows_onto_a_node_that_joins_mid_job(tiny_assets, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes

    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("".join(
        json.dumps({"audio": f"/clips/{i}.wav", "text": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4 + i % 8)),
                    "duration": 1.0, "source": "test"}) + "\n"
        for i in range(ROWS)
    ))
    cfg_dict = {
        "cluster": {"storage_root": str(tmp_path / "runs"), "run_id": "elastic"},
        "model": {"lm_path": str(tiny_assets / "lm"), "whisper_path": str(tiny_assets / "whisper")},
        "label": {"engine": "transformers", "batch_size": 4, "max_new_tokens": 24, "rows_per_shard": 32,
                  "manifests": [str(manifest)], "min_replicas": 1, "max_replicas": 2, "cpus_per_replica": 0.5,
                  "resources_per_replica": {"labeller": 1}, "log_every_s": 2.0},
    }
    cfg_path = tmp_path / "label.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))
    cfg = config_from_dict(cfg_dict)

    cluster = start_local_cluster(num_cpus=1)  # head: the job driver and read tasks; no engine fits here
    try:
        _join_node(cluster, num_cpus=1, resources='{"labeller": 1}')
        address = cluster.dashboard_url
        first_nodes = {n.node_id for n in list_nodes(address=address)}
        assert len(first_nodes) == 2

        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=f"{sys.executable} -m jobs.label --config {cfg_path}",
                                   metadata={"blsp_stage": "label"})
        job = (client, job_id)
        # Mid-job: the first replica is labelling (shards are being committed).
        _wait(lambda: len(list(Path(stats_dir(cfg)).glob("*.json"))) >= 2, 150, "the first committed shards", job)
        t_join = time.time()
        committed_at_join = len(list(Path(stats_dir(cfg)).glob("*.json")))
        _join_node(cluster, num_cpus=1, resources='{"labeller": 1}')
        new_nodes = {n.node_id for n in list_nodes(address=address)} - first_nodes
        assert len(new_nodes) == 1
        new_node = new_nodes.pop()

        on_new_node = _wait(lambda: [a for a in _engine_actors(address) if a.node_id == new_node and a.state == "ALIVE"],
                            120, "an engine replica on the new node", job)
        t_replica = time.time()
        status = _wait(lambda: (s := client.get_job_status(job_id)).is_terminal() and s, 240, "the job to finish")
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]

        # The new node's replica labelled rows: its actor ran map tasks there.
        from ray.util.state import list_tasks

        tasks = list_tasks(address=address, filters=[("node_id", "=", new_node)], detail=True, limit=10000,
                           raise_on_missing_output=False)
        engine_tasks = [t for t in tasks if ENGINE in (t.name or "") or (t.actor_id in {a.actor_id for a in on_new_node})]
        assert any(t.state == "FINISHED" for t in engine_tasks), [(t.name, t.state) for t in tasks][:20]
        print(f"\nshards committed when the node joined: {committed_at_join} of {ROWS // 32}; "
              f"replica on it ALIVE {t_replica - t_join:.1f}s after the join; "
              f"{sum(t.state == 'FINISHED' for t in engine_tasks)} engine tasks finished there")
    finally:
        cluster.stop()

    # Every row labelled exactly once.
    rows = pq.read_table(RunLayout.of(cfg).labels).to_pylist()
    ids = [r[ROW_ID] for r in rows]
    assert len(ids) == len(set(ids)) == ROWS
    assert set(ids) == {f"asr.jsonl:{i}" for i in range(ROWS)}
    assert all(r["generated_tokens"] > 0 for r in rows)
