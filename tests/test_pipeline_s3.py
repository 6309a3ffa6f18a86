"""The tiny pipeline end to end with its run dir on S3 (moto's standalone server on 127.0.0.1),
every stage a Ray job on the session's cluster."""

import json
import uuid
from pathlib import Path

import pytest

from blsp_ray.config import load_config
from blsp_ray.stages.pipeline import STAGES, run_pipeline

REPO = Path(__file__).resolve().parents[1]
BUCKET = "blsp-runs"


@pytest.mark.slow
def test_tiny_pipeline_on_s3(ray_cluster, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)
    run_id = f"s3-e2e-{uuid.uuid4().hex[:8]}"
    speech = tmp_path / "speech"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"cluster.address={ray_cluster.dashboard_url}",
        f"cluster.storage_root=s3://{BUCKET}/runs",
        f"cluster.run_id={run_id}",
        f"cluster.s3.endpoint_url={s3_server}",
        "cluster.s3.region=us-east-1",
        # The session cluster started before the S3 server: the jobs get its credentials here.
        "cluster.env_vars.AWS_ACCESS_KEY_ID=test",
        "cluster.env_vars.AWS_SECRET_ACCESS_KEY=test",
        f"cluster.env_vars.BLSP_MODEL_CACHE={tmp_path / 'model-cache'}",
        f"assets.out_dir={tmp_path / 'assets'}",
        f"model.lm_path={tmp_path / 'assets' / 'lm'}",
        f"model.whisper_path={tmp_path / 'assets' / 'whisper'}",
        f"speech.out_dir={speech}",
        "speech.num_sentences=10",
        f"data.alpaca_json={speech / 'alpaca_data.json'}",
        f"label.manifests=[{speech / 'train.jsonl'}]",
        # stage 1 as configs/tiny.yaml (fewer steps leave an LM that stops at once: no continuations)
        "stage2.max_steps=2", "stage2.save_every=2", "stage2.log_every=1",
        "label.max_new_tokens=8", "generate.max_new_tokens=8",
    ])
    expected = [s.name for s in STAGES if s.enabled(cfg)]
    assert expected == ["assets", "speech", "prepare_alpaca", "stage1", "label", "preprocess", "stage2", "generate", "evaluate"]

    assert run_pipeline(cfg) == expected

    prefix = f"runs/{run_id}/"
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=BUCKET, Key=prefix + key)["Body"].read()

    assert {f"{name}/_COMPLETE" for name in expected} <= keys
    assert "config.yaml" in keys
    # stage 1 -> stage 2: the adapter points at the run's stage-1 model, by its S3 URI
    assert {"stage1/model/config.json", "stage1/model/_COMPLETE", "stage2/model/_COMPLETE"} <= keys
    adapter = json.loads(read("stage2/model/blsp_adapter.json"))
    assert adapter["lm_path"] == f"s3://{BUCKET}/{prefix}stage1/model"
    assert any(k.startswith("stage2/model/") and k.endswith(".safetensors") for k in keys)
    # Ray Train checkpoints went to S3 too
    for stage in ("stage1", "stage2"):
        assert any(k.startswith(f"{stage}/ray/") and "/checkpoint_" in k for k in keys), stage
    # every stage's outputs
    assert any(k.startswith("data/stage1") for k in keys)
    assert any(k.startswith("label/shards/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("preprocess/shards/") and k.endswith(".parquet") for k in keys)
    heldout = [json.loads(line) for line in (speech / "heldout.jsonl").read_text().splitlines() if line.strip()]
    generations = [json.loads(line) for line in read("generate/heldout.jsonl").decode().splitlines()]
    assert len(generations) == len(heldout) and all("response" in g for g in generations)
    report = json.loads(read("evaluate/report.json"))
    assert report["scored"] == len(heldout) and "wer" in report["metrics"]
    assert "evaluate/report.md" in keys

    # nothing of the run on local disk
    local = [p for d in (REPO / "runs", Path.cwd() / "runs", tmp_path) if d.exists() for p in d.rglob(f"*{run_id}*")]
    assert not local

    assert run_pipeline(cfg) == []  # a rerun skips every stage
