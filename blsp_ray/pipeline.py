"""The pipeline driver: each stage is its own Ray job, submitted in order through the job API.

A stage that finished writes ``<run dir>/<stage>/_COMPLETE``; a rerun skips it. The driver
streams each job's logs, and stops at the first failed stage with its job id and log tail.
With no Ray address configured it starts a local head on 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from blsp_ray.config import BlspRayConfig
from blsp_ray.layout import RunLayout, join

log = logging.getLogger(__name__)


def _heldout_manifest(cfg: BlspRayConfig) -> str | None:
    if cfg.generate.input_file:
        return cfg.generate.input_file
    return f"{cfg.speech.out_dir}/heldout.jsonl" if cfg.speech is not None else None


def _generate_args(cfg: BlspRayConfig, run: RunLayout) -> list[str]:
    return ["--input_file", _heldout_manifest(cfg), "--output_file", join(run.generations, "heldout.jsonl"),
            "--blsp_model", run.stage2_model]


def _evaluate_args(cfg: BlspRayConfig, run: RunLayout) -> list[str]:
    # Transcription instruction by default: score responses against the transcripts.
    return ["--predictions", join(run.generations, "heldout.jsonl"), "--reference_field", "text",
            "--blsp_model", run.stage2_model]


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # `python -m <module> --config <run config> [args]`
    enabled: Callable[[BlspRayConfig], bool] = lambda cfg: True
    args: Callable[[BlspRayConfig, RunLayout], list[str]] = lambda cfg, run: []


STAGES = [
    Stage("assets", "jobs.build_assets", enabled=lambda c: c.assets is not None or c.pretrained is not None),
    Stage("speech", "jobs.make_speech", enabled=lambda c: c.speech is not None),
    Stage("prepare_alpaca", "jobs.prepare_alpaca", enabled=lambda c: bool(c.data.alpaca_json)),
    Stage("prepare_asr", "jobs.prepare_asr",
          enabled=lambda c: any((c.data.librispeech_dir, c.data.gigaspeech_dir, c.data.commonvoice_dir))),
    Stage("stage1", "jobs.stage1", enabled=lambda c: bool(c.data.alpaca_json)),
    Stage("label", "jobs.label"),
    Stage("preprocess", "jobs.preprocess"),
    Stage("stage2", "jobs.stage2"),
    Stage("generate", "jobs.generate", enabled=lambda c: _heldout_manifest(c) is not None, args=_generate_args),
    Stage("evaluate", "jobs.evaluate", enabled=lambda c: _heldout_manifest(c) is not None, args=_evaluate_args),
]


class StageFailed(RuntimeError):
    pass


def run_dir(cfg: BlspRayConfig) -> Path:
    return Path(cfg.cluster.storage_root) / cfg.cluster.run_id


def _absolute_paths(cfg: BlspRayConfig) -> dict:
    """The config as a dict with local relative paths made absolute: jobs may run in another cwd."""
    data = cfg.model_dump(mode="json")

    def fix(node):
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        if isinstance(node, str) and not node.startswith(("s3://", "/")) and ("/" in node or node in {"runs", "data", "assets"}):
            return str(Path(node).resolve())
        return node

    for key in ("cluster", "model", "assets", "pretrained", "speech", "data", "label", "generate", "serve"):
        if data.get(key) is not None:
            data[key] = fix(data[key])
    data["cluster"]["cluster_file"] = cfg.cluster.cluster_file  # a file of the repo, not an output
    return data


def run_pipeline(cfg: BlspRayConfig, stages: list[Stage] | None = None) -> list[str]:
    """Run every stage not yet complete; returns the names of the stages run this time."""
    from ray.job_submission import JobSubmissionClient

    from blsp_ray.cluster import start_local_cluster

    stages = [s for s in (stages or STAGES) if s.enabled(cfg)]
    root = run_dir(cfg).resolve()
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(_absolute_paths(cfg), sort_keys=False))

    local = None
    address = cfg.cluster.address
    if address is None:
        local = start_local_cluster(num_cpus=os.cpu_count())
        address = local.dashboard_url
    print(f"Ray dashboard: {address}", flush=True)
    ran = []
    try:
        client = JobSubmissionClient(address)
        for stage in stages:
            marker = root / stage.name / "_COMPLETE"
            if marker.exists():
                print(f"[{stage.name}] complete, skipped", flush=True)
                continue
            args = stage.args(cfg, RunLayout(str(root)))
            _run_stage(client, stage, config_path, args, cfg.cluster.env_vars)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
            ran.append(stage.name)
    finally:
        if local is not None:
            local.stop()
    return ran


def _run_stage(client, stage: Stage, config_path: Path, args: list[str], env_vars: dict[str, str]) -> None:
    from ray.job_submission import JobStatus

    command = [sys.executable, "-m", stage.module, "--config", str(config_path), *args]
    entrypoint = " ".join(shlex.quote(c) for c in command)
    t0 = time.time()
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"env_vars": dict(env_vars)},
        metadata={"blsp_stage": stage.name},
    )
    print(f"[{stage.name}] submitted as {job_id}", flush=True)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job_id)
        raise StageFailed(f"stage {stage.name!r} {status.value} (job {job_id}); log tail:\n{logs[-3000:]}")
    print(f"[{stage.name}] done in {time.time() - t0:.1f}s", flush=True)
