import threading
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from blsp_ray.config import load_config
from blsp_ray.stages.pipeline import STAGES, Stage, StageFailed, run_pipeline

REPO = Path(__file__).resolve().parents[1]


def test_driver_resumes_after_a_stage_is_killed(ray_cluster, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"cluster.address={ray_cluster.dashboard_url}",
        f"cluster.storage_root={tmp_path / 'runs'}",
        f"assets.out_dir={tmp_path / 'assets'}",
        f"speech.out_dir={tmp_path / 'speech'}",
        "speech.num_sentences=4",
    ])
    stages = [s for s in STAGES if s.name in ("assets", "speech")] + [Stage("probe", "tests.pipeline_probe")]
    probe_dir = tmp_path / "runs" / "tiny" / "probe"
    probe_dir.mkdir(parents=True)
    (probe_dir / "hold").touch()

    client = JobSubmissionClient(ray_cluster.dashboard_url)

    def kill_probe_job():  # stop the probe stage's Ray job once it is running
        deadline = time.time() + 120
        while time.time() < deadline:
            for job in client.list_jobs():
                if (job.metadata or {}).get("blsp_stage") == "probe" and job.status == JobStatus.RUNNING:
                    if (probe_dir / "runs.log").exists():
                        client.stop_job(job.submission_id)
                        return
            time.sleep(0.3)

    killer = threading.Thread(target=kill_probe_job)
    killer.start()
    with pytest.raises(StageFailed, match="stage 'probe' STOPPED"):
        run_pipeline(cfg, stages)
    killer.join()
    assert (tmp_path / "runs" / "tiny" / "assets" / "_COMPLETE").exists()
    assert not (probe_dir / "_COMPLETE").exists()
    assets_marker = (tmp_path / "runs" / "tiny" / "assets" / "_COMPLETE").stat().st_mtime_ns

    (probe_dir / "hold").unlink()
    ran = run_pipeline(cfg, stages)
    assert ran == ["probe"]  # completed stages are not rerun
    assert (probe_dir / "runs.log").read_text().count("run") == 2
    assert (tmp_path / "runs" / "tiny" / "assets" / "_COMPLETE").stat().st_mtime_ns == assets_marker
    assert run_pipeline(cfg, stages) == []


def test_label_stage_runs_only_when_some_clip_learns_a_continuation():
    def stages(share: float) -> list[str]:
        cfg = load_config(REPO / "configs" / "mini.yaml", [f"stage2.transcription_share={share}"])
        return [s.name for s in STAGES if s.enabled(cfg)]

    assert "label" in stages(0.0) and "label" in stages(0.5)
    assert stages(1.0) == [name for name in stages(0.5) if name != "label"]  # every clip learns its transcript


def test_follow_job_prints_the_whole_log_and_returns_the_status(ray_cluster, capsys):
    """The driver stops following a job when its status is terminal, not when Ray's log tail closes:
    what it printed is still the job's whole log, in order, and the status is the job's."""
    import sys

    from blsp_ray.runtime import follow_job, submit_stage

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    script = ("import sys, time\n"
              "for i in range(300):\n"
              "    print(f'line {i} ' + 'é' * (i % 3), flush=True)\n"
              "    if i % 100 == 99: time.sleep(0.5)\n"
              "print('last line, no newline', end='', flush=True)\n"
              "sys.exit(3)\n")
    job_id = submit_stage(client, "follow", [sys.executable, "-c", script], {})
    capsys.readouterr()
    assert follow_job(client, job_id) == JobStatus.FAILED
    printed = capsys.readouterr().out
    assert printed == client.get_job_logs(job_id)
    assert printed.count("\n") >= 300 and printed.endswith("last line, no newline")
