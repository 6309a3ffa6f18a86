"""Load on a BLSP chat replica: req/s and p50/p95 latency at several concurrencies, per engine, in one run.

Three ways one replica can answer a chat turn (text + a clip), measured one after another on the
same checkpoint, clips and settings:

* ``native``: vLLM's native BLSP model (``SpeechLM`` with ``engine: vllm``, what the Serve app
  runs): token ids + the clip go in, Whisper + adapter run inside the engine, continuous batching;
* ``prompt_embeds``: the earlier path, the baseline for the native model: Whisper + adapter run in
  the replica (one request at a time, as the app did) and vLLM's ``AsyncLLM`` on the LM alone
  takes the spliced embeddings as ``prompt_embeds``;
* ``transformers``: Whisper + adapter + the LM's ``generate`` in the replica, one request at a time
  (the Serve app's transformers path), the baseline measured in the same run.

Engine level: the replica's work, without HTTP (``tests/test_serve*.py`` cover the app). Every
request asks for ``--max-tokens`` greedy tokens about a clip no earlier request had (vLLM caches
processed audio by content); req/s counts completed requests over the level's wall time, latency
is per request from submission to its last token.

    python benchmarks/serve_load.py --config configs/mini.yaml     # the mini run's checkpoint if trained, else an untrained adapter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for key, value in {
    "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ.setdefault(key, value)

INSTRUCTION = "Please transcribe the following audio."


def checkpoint_for(cfg, given: str | None, work: Path) -> tuple[str, str]:
    """(checkpoint, what it is): ``given``, the run's stage-2 model, or an untrained adapter on the config's models."""
    from blsp_ray.io.layout import RunLayout
    from blsp_ray.model.modeling import build_blsp

    if given:
        return given, "given"
    trained = Path(RunLayout.of(cfg).stage2_model)
    if (trained / "blsp_adapter.json").exists():
        return str(trained), "the run's trained adapter"
    out = work / "untrained"
    build_blsp(cfg.model).save_adapter(out, cfg.model.lm_path, cfg.model.whisper_path)
    return str(out), "an untrained adapter (train the run for representative speech lengths)"


def clips_for(cfg, n: int):
    """Up to ``n`` held-out clips of the config's speech, else 1 s tones."""
    import numpy as np

    from blsp_ray.io.storage import read_jsonl
    from blsp_ray.model.audio import load_audio

    manifest = Path(cfg.heldout_manifest() or "")
    if manifest.is_file():
        rows = read_jsonl(manifest)[:n]
        return [load_audio(r["audio"]) for r in rows], f"{len(rows)} held-out clips of {manifest}"
    t = np.arange(16000) / 16000
    return [(0.3 * np.sin(2 * np.pi * (200 + i) * t)).astype(np.float32) for i in range(n)], f"{n} 1 s tones"


async def drive(answer, prompts: list, concurrency: int) -> dict:
    """Run ``answer(prompt)`` (-> completion tokens) over ``prompts``, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    latencies, tokens = [], []

    async def one(prompt) -> None:
        async with gate:
            t0 = time.perf_counter()
            tokens.append(await answer(prompt))
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {"concurrency": concurrency, "requests": len(prompts), "req_s": len(lat) / wall, "p50_s": pct(0.50),
            "p95_s": pct(0.95), "tok_s": sum(tokens) / wall, "mean_tokens": sum(tokens) / len(tokens)}


def measure(name: str, answer, turns: list, levels: list[int], per_level: int) -> list[dict]:
    """Every level in one event loop (an AsyncLLM stays with the loop it first ran on). Each request
    takes the next clip, so no level is served from vLLM's multimodal caches of an earlier one
    (they repeat only when ``turns`` runs out, which the summary line says)."""
    position = 0

    def take(k: int) -> list:
        nonlocal position
        out = [turns[(position + i) % len(turns)] for i in range(k)]
        position += k
        return out

    async def levels_in_turn() -> list[dict]:
        await drive(answer, take(2), 2)  # warm-up
        rows = []
        for c in levels:
            r = await drive(answer, take(max(per_level, c)), c)
            rows.append(r)
            print(f"[{name}] c={c:>2} {r['req_s']:.2f} req/s  p50 {r['p50_s']:.3f}s  p95 {r['p95_s']:.3f}s  {r['tok_s']:.1f} tok/s "
                  f"({r['mean_tokens']:.1f} tok/req)", flush=True)
        return rows

    return asyncio.run(levels_in_turn())


def run_native(checkpoint: str, serve_cfg, dtype: str, settings, turns, levels, per_level) -> list[dict]:
    from blsp_ray.speech_lm import SpeechLM

    t0 = time.perf_counter()
    speech_lm = SpeechLM.from_checkpoint(checkpoint, serve_cfg.model_copy(update={"engine": "vllm"}), settings, dtype=dtype,
                                         streaming=True)
    print(f"[native] engine up in {time.perf_counter() - t0:.1f}s (export included)", flush=True)

    async def answer(turn) -> int:
        final = None
        async for _, done in speech_lm.engine.stream(speech_lm.audio_prompt([turn]), settings):
            final = done or final
        return len(final.token_ids)

    try:
        return measure("native", answer, turns, levels, per_level)
    finally:
        speech_lm.engine.shutdown()


def run_prompt_embeds(checkpoint: str, serve_cfg, dtype: str, settings, turns, levels, per_level) -> list[dict]:
    from vllm import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from blsp_ray.engines import prepare_vllm_env, vllm_engine_kwargs, vllm_sampling_params
    from blsp_ray.model.modeling import checkpoint_bases
    from blsp_ray.speech_lm import SpeechLM

    t0 = time.perf_counter()
    embedder = SpeechLM.from_checkpoint(checkpoint, serve_cfg.model_copy(update={"engine": "transformers"}), settings, dtype=dtype)
    lm_dir, _ = checkpoint_bases(checkpoint)
    prepare_vllm_env(serve_cfg)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # AsyncLLM's engine core is a process of its own
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**vllm_engine_kwargs(serve_cfg, lm_dir, dtype), enable_prompt_embeds=True,
                                                    disable_log_stats=True))
    print(f"[prompt_embeds] engine up in {time.perf_counter() - t0:.1f}s", flush=True)
    params = vllm_sampling_params(settings, output_kind=RequestOutputKind.FINAL_ONLY)
    embed_lock = threading.Lock()  # the replica encodes one conversation at a time, as the app did

    def embed(turn):
        with embed_lock:
            return embedder.prompt_embeds([turn]).detach().float().cpu()

    async def answer(turn) -> int:
        embeds = await asyncio.to_thread(embed, turn)
        final = None
        async for out in llm.generate({"prompt_embeds": embeds}, params, uuid.uuid4().hex):
            final = out
        return len(final.outputs[0].token_ids)

    try:
        return measure("prompt_embeds", answer, turns, levels, per_level)
    finally:
        llm.shutdown()


def run_transformers(checkpoint: str, serve_cfg, dtype: str, settings, turns, levels, per_level) -> list[dict]:
    from blsp_ray.speech_lm import SpeechLM

    speech_lm = SpeechLM.from_checkpoint(checkpoint, serve_cfg.model_copy(update={"engine": "transformers"}), settings, dtype=dtype)
    lock = asyncio.Lock()  # one generation at a time per replica, as the app runs it

    def generate(turn) -> int:
        stream = speech_lm.stream(speech_lm.prompt_embeds([turn]), settings)
        for _ in stream:
            pass
        return stream.completion_tokens

    async def answer(turn) -> int:
        async with lock:
            return await asyncio.to_thread(generate, turn)

    return measure("transformers", answer, turns, levels, per_level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mini.yaml")
    parser.add_argument("--checkpoint", help="BLSP checkpoint (default: the config's run's stage-2 model, else an untrained adapter)")
    parser.add_argument("--engines", default="native,prompt_embeds,transformers")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    import torch

    from blsp_ray.config import load_config
    from blsp_ray.engines import GenerationSettings, replica_dtype
    from blsp_ray.speech_lm import ChatTurn

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    for key, sub in {"VLLM_CACHE_ROOT": "vllm-cache", "VLLM_RPC_BASE_PATH": "vllm-rpc", "TORCHINDUCTOR_CACHE_DIR": "inductor",
                     "BLSP_MODEL_CACHE": "models"}.items():
        os.environ.setdefault(key, str(work / sub))
    cfg = load_config(args.config)
    checkpoint, what = checkpoint_for(cfg, args.checkpoint, work)
    levels = [int(c) for c in args.concurrency.split(",")]
    needed = 2 + sum(max(args.requests_per_level, c) for c in levels)
    waves, which = clips_for(cfg, needed)
    which += "" if len(waves) >= needed else f" (fewer than the {needed} requests: later ones repeat clips)"
    turns = [ChatTurn(INSTRUCTION, w) for w in waves]
    settings = GenerationSettings(max_new_tokens=args.max_tokens, temperature=0.0)
    serve_cfg = cfg.serve.model_copy(update={"max_new_tokens": args.max_tokens})
    dtype = replica_dtype(serve_cfg.engine_dtype(cfg.model), serve_cfg)  # as a Serve replica on this machine resolves it
    torch.set_num_threads(os.cpu_count())
    runners = {"native": run_native, "prompt_embeds": run_prompt_embeds, "transformers": run_transformers}
    results = {}
    for engine in args.engines.split(","):
        results[engine] = runners[engine](checkpoint, serve_cfg, dtype, settings, turns, levels, args.requests_per_level)

    print(f"\nserve_load: one replica, engine level (no HTTP), {os.cpu_count()} CPUs, checkpoint {checkpoint} ({what}), "
          f"{which}, weights {dtype}, max_tokens {args.max_tokens} greedy, {args.requests_per_level} requests per level")
    print(f"{'engine':<15}{'conc':>5}{'req/s':>9}{'p50 s':>9}{'p95 s':>9}{'tok/s':>9}{'tok/req':>9}")
    for engine, rows in results.items():
        for r in rows:
            print(f"{engine:<15}{r['concurrency']:>5}{r['req_s']:>9.2f}{r['p50_s']:>9.3f}{r['p95_s']:>9.3f}{r['tok_s']:>9.1f}{r['mean_tokens']:>9.1f}")
    for base in ("transformers", "prompt_embeds"):
        if "native" in results and base in results:
            for b, r in zip(results[base], results["native"]):
                print(f"native / {base} at c={r['concurrency']}: {r['req_s'] / b['req_s']:.2f}x req/s, "
                      f"p95 {r['p95_s']:.3f}s vs {b['p95_s']:.3f}s")
    print(json.dumps({"checkpoint": checkpoint, "checkpoint_is": what, "clips": which, "max_tokens": args.max_tokens,
                      "dtype": dtype, "results": results}))


if __name__ == "__main__":
    main()
