"""The tiny pipeline end to end with its run dir on S3 (moto's standalone server on 127.0.0.1),
every stage a Ray job on the session's cluster (the ``tiny_s3_run`` fixture: tests/test_train.py
reads the same run's training)."""

import json
from pathlib import Path

import pytest

from blsp_ray.stages.pipeline import STAGES, run_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_pipeline_on_s3(tiny_s3_run):
    run = tiny_s3_run
    expected = [s.name for s in STAGES if s.enabled(run.cfg)]
    assert expected == ["assets", "speech", "prepare_alpaca", "stage1", "label", "preprocess", "stage2", "generate", "evaluate"]
    assert run.ran == expected

    keys = run.keys()
    assert {f"{name}/_COMPLETE" for name in expected} <= keys
    assert "config.yaml" in keys
    # stage 1 -> stage 2: the adapter points at the run's stage-1 model, by its S3 URI
    assert {"stage1/model/config.json", "stage1/model/_COMPLETE", "stage2/model/_COMPLETE"} <= keys
    adapter = json.loads(run.read("stage2/model/blsp_adapter.json"))
    assert adapter["lm_path"] == f"s3://{run.bucket}/{run.prefix}stage1/model"
    assert any(k.startswith("stage2/model/") and k.endswith(".safetensors") for k in keys)
    # Ray Train checkpoints went to S3 too
    for stage in ("stage1", "stage2"):
        assert any(k.startswith(f"{stage}/ray/") and "/checkpoint_" in k for k in keys), stage
    # every stage's outputs
    assert any(k.startswith("data/stage1") for k in keys)
    assert any(k.startswith("label/shards/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("preprocess/shards/") and k.endswith(".parquet") for k in keys)
    heldout = [json.loads(line) for line in (run.speech / "heldout.jsonl").read_text().splitlines() if line.strip()]
    generations = [json.loads(line) for line in run.read("generate/heldout.jsonl").decode().splitlines()]
    assert len(generations) == len(heldout) and all("response" in g for g in generations)
    report = json.loads(run.read("evaluate/report.json"))
    assert report["scored"] == len(heldout) and "wer" in report["metrics"]
    assert "evaluate/report.md" in keys

    # nothing of the run on local disk
    run_id = run.cfg.cluster.run_id
    local = [p for d in (REPO / "runs", Path.cwd() / "runs", run.speech.parent) if d.exists() for p in d.rglob(f"*{run_id}*")]
    assert not local

    assert run_pipeline(run.cfg) == []  # a rerun skips every stage
