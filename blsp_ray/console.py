"""The ``blsp-ray`` command (installed by pyproject): the pipeline, one stage, a stage submitted to a
running cluster, and a loopback-only Ray head of your own.

    blsp-ray run --config configs/tiny.yaml                        # the whole pipeline, here
    blsp-ray stage label --config configs/tiny.yaml                # one stage, here
    blsp-ray local-cluster start --port 6390 --dashboard-port 8265  # a head on 127.0.0.1 only
    blsp-ray submit label --address http://127.0.0.1:8265 --config configs/tiny.yaml --wait
    blsp-ray local-cluster stop --port 6390                        # that head's processes, nothing else
    blsp-ray export-vllm runs/tiny/stage2/model exports/tiny       # a checkpoint `vllm serve` loads

``run`` and ``stage`` are ``python -m jobs.pipeline`` / ``python -m jobs.<stage>``. ``submit`` uses
Ray's job SDK: the entry point is this environment's python (not whatever ``python`` the head's
PATH has) started in this directory, so a relative ``--config`` and the relative paths inside it
mean what they mean here; the job's metadata names the stage (``blsp_stage``), its id starts with
``blsp-<stage>-``. That fits a head on this machine or nodes with the same image and a shared
filesystem; elsewhere, install blsp-ray in the nodes' image and use storage paths they all see.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from blsp_ray.config import load_config
from blsp_ray.io.storage import cache_dir
from blsp_ray.model.export import export_for_vllm
from blsp_ray.runtime import LocalRayCluster, follow_job, job_env, start_local_cluster, submit_stage

STAGES_DIR = Path(__file__).resolve().parent / "stages"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # holds blsp_ray/ and jobs/


def stage_names() -> list[str]:
    """Every stage with an entry point (``blsp_ray/stages/<name>.py`` with ``jobs/<name>.py``)."""
    return sorted(p.stem for p in STAGES_DIR.glob("*.py") if p.stem != "__init__")


def run_stage(stage: str, args: list[str]) -> None:
    """``python -m jobs.<stage> args...`` in this process."""
    sys.argv = [f"jobs.{stage}", *args]
    importlib.import_module(f"blsp_ray.stages.{stage}").main()


def submit(stage: str, address: str, config: str, args: list[str], wait: bool) -> str:
    """Submit ``jobs.<stage>`` to the cluster whose job API is ``address``; with ``wait``, stream its
    logs to its end (exit status 1 unless it succeeded)."""
    cfg = load_config(config)  # a bad config fails here, not on the head
    env = {**job_env(cfg), "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}
    client = JobSubmissionClient(address)
    job_id = submit_stage(client, stage, [sys.executable, "-m", f"jobs.{stage}", "--config", config, *args], env, cwd=os.getcwd())
    print(f"submitted {job_id}; logs: ray job logs --address {address} {job_id}", flush=True)
    if wait:
        status = follow_job(client, job_id)
        print(f"{job_id}: {status.value}", flush=True)
        if status != JobStatus.SUCCEEDED:
            raise SystemExit(1)
    return job_id


def _state_file(port: int) -> Path:
    return Path(f"/tmp/blsp-ray-head-{port}.json")


def local_cluster(action: str, port: int, dashboard_port: int, num_cpus: int | None) -> None:
    """Start or stop a Ray head that listens on 127.0.0.1 only; ``stop`` ends the processes of the
    head started on ``port`` (by its temp dir), never other clusters (as ``ray stop`` would)."""
    state = _state_file(port)
    if action == "start":
        if state.exists():
            raise SystemExit(f"a head on port {port} is recorded in {state}: stop it first")
        cluster = start_local_cluster(num_cpus=num_cpus, port=port, dashboard_port=dashboard_port)
        state.write_text(json.dumps({"address": cluster.address, "dashboard_url": cluster.dashboard_url,
                                     "temp_dir": str(cluster.temp_dir)}))
        print(f"Ray head on {cluster.address} (127.0.0.1 only); job API and dashboard {cluster.dashboard_url}")
        print(f"stop it with: blsp-ray local-cluster stop --port {port}")
        return
    if not state.exists():
        raise SystemExit(f"no head started by blsp-ray on port {port} ({state} missing)")
    info = json.loads(state.read_text())
    LocalRayCluster(info["address"], info["dashboard_url"], Path(info["temp_dir"])).stop()
    state.unlink()
    print(f"stopped the Ray head on {info['address']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="blsp-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the whole pipeline here (python -m jobs.pipeline)", add_help=False)
    st = sub.add_parser("stage", help="one stage here (python -m jobs.<stage>)")
    st.add_argument("stage", choices=stage_names())
    sm = sub.add_parser("submit", help="one stage as a Ray job on a running cluster")
    sm.add_argument("stage", choices=stage_names())
    sm.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    sm.add_argument("--config", required=True)
    sm.add_argument("--wait", action="store_true", help="follow the job to its end; exit 1 unless it succeeded")
    lc = sub.add_parser("local-cluster", help="a Ray head on 127.0.0.1 only, on chosen ports")
    lc.add_argument("action", choices=["start", "stop"])
    lc.add_argument("--port", type=int, default=6390, help="GCS port (what `ray start --address` takes)")
    lc.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job API")
    lc.add_argument("--num-cpus", type=int, default=None)
    ex = sub.add_parser("export-vllm", help="a BLSP checkpoint as a directory vLLM serves natively (vllm serve DIR)")
    ex.add_argument("checkpoint", help="adapter-only, full, or the original release's layout")
    ex.add_argument("out_dir")
    ex.add_argument("--pad-audio-to-30s", action=argparse.BooleanOptionalAction, default=None,
                    help="override what the checkpoint records (the original release's: padded)")
    args, rest = p.parse_known_args(argv)
    if args.command == "run":
        run_stage("pipeline", rest)
    elif args.command == "stage":
        run_stage(args.stage, rest)
    elif args.command == "submit":
        submit(args.stage, args.address, args.config, rest, args.wait)
    elif args.command == "export-vllm":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        out = Path(args.out_dir)
        if out.exists():
            p.error(f"{out} exists: remove it or export elsewhere")
        with cache_dir(out) as tmp:  # whole or absent
            export_for_vllm(args.checkpoint, tmp, args.pad_audio_to_30s)
        print(f"{out}: serve it with `vllm serve {out}` (speech in chat messages as input_audio parts)")
    else:
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        local_cluster(args.action, args.port, args.dashboard_port, args.num_cpus)
