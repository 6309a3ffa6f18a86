"""The pipeline driver: each stage is its own Ray job, submitted in order through the job API.

A stage that finished writes ``<run dir>/<stage>/_COMPLETE``; a rerun skips it. The driver
streams each job's logs, and stops at the first failed stage with its job id and log tail.
With no Ray address configured it starts a local head on 127.0.0.1 and stops it at the end.

The run dir (``cluster.storage_root/run_id``) is a local path or s3:// URI; markers and the run
config (``<run dir>/config.yaml``, which every job reads) live there, through blsp_ray.io.storage.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import BlspRayConfig, resolve_paths
from blsp_ray.io.layout import COMPLETE, RunLayout, join
from blsp_ray.io.storage import exists, is_s3, write_text
from blsp_ray.runtime import follow_job, job_env, start_local_cluster, submit_stage


def _generate_args(cfg: BlspRayConfig, run: RunLayout) -> list[str]:
    return ["--input_file", cfg.heldout_manifest(), "--output_file", join(run.generations, "heldout.jsonl"),
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
    Stage("label", "jobs.label", enabled=lambda c: c.labels_continuations()),
    Stage("preprocess", "jobs.preprocess"),
    Stage("stage2", "jobs.stage2"),
    Stage("generate", "jobs.generate", enabled=lambda c: c.heldout_manifest() is not None, args=_generate_args),
    Stage("evaluate", "jobs.evaluate", enabled=lambda c: c.heldout_manifest() is not None, args=_evaluate_args),
]


class StageFailed(RuntimeError):
    pass


def run_dir(cfg: BlspRayConfig) -> str:
    """``<storage_root>/<run_id>``: an s3:// URI, or an absolute local path (jobs run in another cwd)."""
    root = RunLayout.of(cfg).root
    return root if is_s3(root) else str(Path(root).resolve())


def run_pipeline(cfg: BlspRayConfig, stages: list[Stage] | None = None) -> list[str]:
    """Run every stage not yet complete; returns the names of the stages run this time."""
    cfg = resolve_paths(cfg, Path.cwd())  # jobs run in another directory
    stages = [s for s in (stages or STAGES) if s.enabled(cfg)]
    root, s3 = run_dir(cfg), cfg.cluster.s3
    config_path = join(root, "config.yaml")
    write_text(config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), s3)

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
            marker = join(root, stage.name, COMPLETE)
            if exists(marker, s3):
                print(f"[{stage.name}] complete, skipped", flush=True)
                continue
            args = stage.args(cfg, RunLayout(root))
            _run_stage(client, stage, config_path, args, job_env(cfg))
            write_text(marker, time.strftime("%Y-%m-%dT%H:%M:%S\n"), s3)
            ran.append(stage.name)
    finally:
        if local is not None:
            local.stop()
    return ran


def _run_stage(client, stage: Stage, config_path: str, args: list[str], env_vars: dict[str, str]) -> None:
    t0 = time.time()
    job_id = submit_stage(client, stage.name, [sys.executable, "-m", stage.module, "--config", config_path, *args], env_vars)
    print(f"[{stage.name}] submitted as {job_id}", flush=True)
    status = follow_job(client, job_id)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job_id)
        raise StageFailed(f"stage {stage.name!r} {status.value} (job {job_id}); log tail:\n{logs[-3000:]}")
    print(f"[{stage.name}] done in {time.time() - t0:.1f}s", flush=True)


# ---- entry point: jobs/pipeline.py ----


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
