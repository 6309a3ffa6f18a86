"""Labelling throughput, one run, same model and prompts: bare vLLM vs the Ray Data + vLLM job vs
the transformers engine (the original release's batched ``generate``, batches of 8 with left padding).

    .venv/bin/python benchmarks/label_throughput.py [--config configs/tiny.yaml] [--rows 128] [--hf-rows N]

Without --config it builds the tiny random-weight LM offline. Greedy; max_new_tokens is a
bound, so tokens/s counts the tokens actually generated. Engine start is timed separately for
the bare engines; the Ray job's wall time includes its engine start, Ray Data planning and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
             # read when Ray is imported (vLLM imports it): keeps the local cluster on 127.0.0.1
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a run config (its model.lm_path); default: tiny assets built here")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--job-batch-size", type=int, default=32, help="rows per map_batches call into the vLLM actor")
    p.add_argument("--hf-batch-size", type=int, default=8, help="transformers batch (the original release's 8)")
    p.add_argument("--hf-rows", type=int, default=None,
                   help="prompts the transformers baseline runs (the first N; default all): its rate per token does not depend on N")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(work / "vllm-rpc"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))

    from blsp_ray.config import BlspRayConfig, TinyAssetsConfig, config_from_dict, load_config
    from blsp_ray.demo.corpus import make_sentences
    from blsp_ray.engines import (GenerationSettings, TransformersEngine, prepare_vllm_env, replica_dtype, vllm_engine_kwargs,
                                  vllm_sampling_params)
    from blsp_ray.model.prompts import continuation_prompt, make_prompt_format

    if args.config:
        base = load_config(args.config)
    else:
        from blsp_ray.demo.assets import build_tiny_assets

        assets = build_tiny_assets(TinyAssetsConfig(out_dir=str(work / "assets")))
        base = config_from_dict({"model": {"lm_path": str(assets / "lm"), "whisper_path": str(assets / "whisper")}})
    lm = base.model.lm_path
    manifest = work / "asr.jsonl"
    texts = make_sentences(args.rows, seed=1)
    manifest.write_text("".join(json.dumps({"audio": f"/clips/{i}.wav", "text": t, "duration": 2.0, "source": "bench"}) + "\n"
                                for i, t in enumerate(texts)))
    label = base.label.model_copy(update=dict(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.job_batch_size))
    settings = GenerationSettings.from_config(label)
    dtype = replica_dtype(label.engine_dtype(base.model), label)  # the job's replica resolves it the same way
    results = {}

    # 1. bare vLLM: vllm.LLM in this thread (none of our engine code), all prompts in one call
    from vllm import LLM

    vllm_cfg = label.model_copy(update={"engine": "vllm"})
    prepare_vllm_env(vllm_cfg)
    t = time.time()
    llm = LLM(**vllm_engine_kwargs(vllm_cfg, lm, dtype))
    start = time.time() - t
    tokenizer = llm.get_tokenizer()
    prompt_layout = make_prompt_format(base.model.prompt_format, tokenizer)
    prompts = [tokenizer(continuation_prompt(prompt_layout, x, label.instruction))["input_ids"] for x in texts]
    prompts = [ids for ids in prompts if 0 < len(ids) < label.max_prompt_tokens]
    t = time.time()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], vllm_sampling_params(settings), use_tqdm=False)
    el = time.time() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    results["bare_vllm"] = dict(rows=len(outputs), tokens=tokens, seconds=round(el, 2), tokens_per_s=tokens / el,
                                rows_per_s=len(outputs) / el, engine_start_s=round(start, 1))
    print(f"bare vLLM: {results['bare_vllm']}", flush=True)
    del llm, outputs
    import gc

    gc.collect()

    # 2. the Ray Data + vLLM labelling job (local cluster, one engine replica)
    import ray

    from blsp_ray.runtime import start_local_cluster
    from blsp_ray.stages.label import run_label

    cluster = start_local_cluster(num_cpus=2)
    try:
        ray.init(address=cluster.address)
        # Every row is continued, as bare vLLM continues every prompt: a config's transcription share
        # would leave those rows unlabelled (stage 2 learns them from their transcripts), and its
        # continuation_tokens would stop them short of max_new_tokens.
        cfg = BlspRayConfig.model_validate({**base.model_dump(), "cluster": {"storage_root": str(work / "runs"), "run_id": "bench"},
                                            "label": {**label.model_dump(), "engine": "vllm", "manifests": [str(manifest)]},
                                            "stage2": {**base.stage2.model_dump(), "transcription_share": 0.0,
                                                       "continuation_tokens": None}})
        t = time.time()
        summary = run_label(cfg)
        el = time.time() - t
        results["ray_data_vllm_job"] = dict(rows=summary["labelled"], tokens=summary["tokens_generated"], seconds=round(el, 2),
                                            tokens_per_s=summary["tokens_generated"] / el, rows_per_s=summary["labelled"] / el)
    finally:
        ray.shutdown()
        cluster.stop()

    # 3. transformers engine, the original release's batches of 8
    t = time.time()
    hf = TransformersEngine.from_path(lm, label.model_copy(update={"engine": "transformers", "batch_size": args.hf_batch_size}),
                                      settings, dtype)
    start = time.time() - t
    t = time.time()
    gens = hf.generate_ids(prompts[: args.hf_rows])
    el = time.time() - t
    tokens = sum(len(g.token_ids) for g in gens)
    results["transformers"] = dict(rows=len(gens), tokens=tokens, seconds=round(el, 2), tokens_per_s=tokens / el,
                                   rows_per_s=len(gens) / el, engine_start_s=round(start, 1))

    print(f"\nlabel throughput: model {lm}, {len(prompts)} prompts, greedy, max_new_tokens {args.max_new_tokens}, "
          f"CPUs {os.cpu_count()}")
    for name, r in results.items():
        extra = f", engine start {r['engine_start_s']}s (not counted)" if "engine_start_s" in r else " (wall incl. engine start)"
        print(f"  {name:20s} {r['tokens_per_s']:8.1f} tokens/s  {r['rows_per_s']:6.2f} rows/s  "
              f"({r['tokens']} tokens, {r['rows']} rows, {r['seconds']}s{extra})")
    b, j, h = (results[k]["tokens_per_s"] for k in ("bare_vllm", "ray_data_vllm_job", "transformers"))
    print(f"  ratio Ray Data job / bare vLLM: {j / b:.2f}")
    print(f"  ratio bare vLLM / transformers: {b / h:.2f}")
    # The job's wall time includes one engine start; estimate its steady state with the bare engine's start.
    steady = results["ray_data_vllm_job"]["tokens"] / max(results["ray_data_vllm_job"]["seconds"] - results["bare_vllm"]["engine_start_s"], 1e-9)
    print(f"  Ray Data job less one engine start (estimate): {steady:.1f} tokens/s, {steady / b:.2f} of bare vLLM")
    print(json.dumps({"results": results, "job_over_bare_vllm": j / b, "vllm_over_transformers": b / h,
                      "job_steady_over_bare_vllm": steady / b}))


if __name__ == "__main__":
    main()
