"""Load on the BLSP chat service: req/s and p50/p95 latency at several concurrencies, per engine.

Deploys the real Serve application (one engine replica, so engines compare like for like) on a
local Ray cluster on 127.0.0.1, once per engine on the same checkpoint, and drives it with the
``openai`` client: every request carries 1 s of audio and asks for ``--max-tokens`` tokens.
The transformers engine is the baseline measured in the same run.

    python benchmarks/serve_load.py                      # tiny random-weight assets, both engines
    python benchmarks/serve_load.py --config configs/tiny.yaml --checkpoint runs/tiny/stage2/model
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blsp_ray.runtime import free_port, loopback_env, start_local_cluster  # noqa: E402  (after sys.path)

for key, value in {
    "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


def wav_b64(seconds: float = 1.0) -> str:
    import base64

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def tiny_checkpoint(root: Path) -> tuple[Path, Path]:
    import torch

    from blsp_ray.demo.assets import build_tiny_assets
    from blsp_ray.config import TinyAssetsConfig
    from blsp_ray.model.modeling import build_blsp_from_parts

    assets = build_tiny_assets(TinyAssetsConfig(out_dir=str(root / "assets")))
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    build_blsp_from_parts(assets / "lm", assets / "whisper", adapter_inner_dim=64).save_adapter(ckpt, str(assets / "lm"), str(assets / "whisper"))
    return assets, ckpt


def measure(url: str, concurrency: int, n: int, max_tokens: int, audio: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    latencies, tokens, errors = [], [], []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            out = client.chat.completions.create(
                model="blsp", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": f"Request {i}: please transcribe the following audio."},
                    {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}],
            )
            latencies.append(time.perf_counter() - t0)
            tokens.append(out.usage.completion_tokens)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": n, "errors": len(errors), "req_s": len(lat) / wall,
            "p50_s": pct(0.50), "p95_s": pct(0.95), "tok_s": sum(tokens) / wall,
            "mean_tokens": statistics.mean(tokens) if tokens else 0.0, "first_error": errors[0] if errors else ""}


def main() -> None:
    loopback_env()  # this process drives a local cluster on 127.0.0.1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config (default: tiny random-weight assets built here)")
    parser.add_argument("--checkpoint", help="BLSP checkpoint (default: an untrained adapter on the tiny assets)")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests-per-level", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cpus-per-replica", type=float, default=2.0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from blsp_ray.config import config_from_dict, load_config
    from serve.app import APP_NAME, build_app

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(work / "vllm-rpc"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    if args.config:
        base = load_config(args.config)
        checkpoint = args.checkpoint
    else:
        assets, ckpt = tiny_checkpoint(work)
        base = config_from_dict({"model": {"lm_path": str(assets / "lm"), "whisper_path": str(assets / "whisper")}})
        checkpoint = args.checkpoint or str(ckpt)
    levels = [int(c) for c in args.concurrency.split(",")]
    audio = wav_b64(1.0)

    cluster = start_local_cluster(num_cpus=os.cpu_count())
    ray.init(address=cluster.address)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for engine in args.engines.split(","):
            cfg = base.model_copy(deep=True)
            cfg.serve = cfg.serve.model_copy(update={
                "engine": engine, "checkpoint": checkpoint, "min_replicas": 1, "max_replicas": 1,
                "cpus_per_replica": args.cpus_per_replica, "max_new_tokens": max(args.max_tokens, cfg.serve.max_new_tokens),
                "max_ongoing_requests": max(levels) * 2, "auth_token_env": None, "request_timeout_s": 600,
            })
            t0 = time.perf_counter()
            try:
                serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
            except Exception as err:  # e.g. vLLM missing on this machine: report and go on
                print(f"[{engine}] could not deploy: {type(err).__name__}: {str(err)[:500]}", flush=True)
                continue
            print(f"[{engine}] deployed in {time.perf_counter() - t0:.1f}s", flush=True)
            measure(url, 2, 4, args.max_tokens, audio)  # warm-up
            results[engine] = [measure(url, c, max(args.requests_per_level, c), args.max_tokens, audio) for c in levels]
            for r in results[engine]:
                print(f"[{engine}] c={r['concurrency']:>2} {r['req_s']:.2f} req/s  p50 {r['p50_s']:.3f}s  p95 {r['p95_s']:.3f}s  "
                      f"{r['tok_s']:.1f} tok/s  ({r['mean_tokens']:.1f} tok/req, {r['errors']} errors) {r['first_error'][:200]}", flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.stop()

    print(f"\nserve_load: 1 engine replica, {args.cpus_per_replica} CPUs, 1 s audio, max_tokens {args.max_tokens}, "
          f"{args.requests_per_level} requests per level")
    print(f"{'engine':<13}{'conc':>5}{'req/s':>9}{'p50 s':>9}{'p95 s':>9}{'tok/s':>9}{'errors':>8}")
    for engine, rows in results.items():
        for r in rows:
            print(f"{engine:<13}{r['concurrency']:>5}{r['req_s']:>9.2f}{r['p50_s']:>9.3f}{r['p95_s']:>9.3f}{r['tok_s']:>9.1f}{r['errors']:>8}")
    if "transformers" in results and "vllm" in results:
        for base_r, r in zip(results["transformers"], results["vllm"]):
            print(f"vllm / transformers at c={r['concurrency']}: {r['req_s'] / base_r['req_s']:.2f}x req/s")


if __name__ == "__main__":
    main()
