"""Speech inference: the original release's ``generate.py`` as a Ray Data batch job.

Rows ``{"audio": path, ...}`` -> decode + log-mel features in CPU tasks -> ``SpeechLM`` in an
actor pool (one replica per GPU on clusters) -> rows in input order with ``response`` added (or
``error`` for a row that could not be used; the rest go on).

Engines: ``vllm`` gets the spliced [prefix | speech | suffix] embeddings as ``prompt_embeds``
(vLLM batches them like any prompt); ``transformers`` generates from the same embeddings, left
padded. Both greedy by default, and tested to agree.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from transformers import WhisperFeatureExtractor

from blsp_ray.cli import load_job_config
from blsp_ray.config import BlspRayConfig, EngineConfig, S3Config, config_from_dict
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.engines import engine_pool
from blsp_ray.io.storage import is_s3, open_input, open_output
from blsp_ray.model.audio import AudioError, duration_s, load_audio
from blsp_ray.model.modeling import SpeechBatch, adapter_metadata, checkpoint_bases
from blsp_ray.model.processing import log_mel
from blsp_ray.runtime import init_ray
from blsp_ray.speech_lm import SpeechLM, local_checkpoint

log = logging.getLogger(__name__)


# ---- the batch job ------------------------------------------------------------------------------------


def decode_row(row: dict, feature_extractor_path: str, max_duration_s: float, pad_audio_to_30s: bool = False) -> dict:
    """CPU task: audio -> log-mel features [n_mels, F] (flattened) or an error naming the reason."""
    out = {"index": row["index"], "source_json": row["source_json"], "error": "", "features": np.zeros(0, np.float32),
           "n_mels": 0, "frames": 0}
    try:
        item = json.loads(row["source_json"])
        if not isinstance(item, dict) or not isinstance(item.get("audio"), str):
            raise RowDropped(DropReason.BAD_ROW, f"row {row['index']}: no audio path")
        wav = load_audio(item["audio"])
        if duration_s(wav) >= max_duration_s:
            raise AudioError("too_long", f"{item['audio']}: {duration_s(wav):.1f}s >= {max_duration_s}s")
        # The clip's own frames only (30 s only where the encoder reads the padding), as in training.
        speech = log_mel(_feature_extractor(feature_extractor_path), [wav], pad_audio_to_30s)
        feats = speech.features[0].numpy()  # [n_mels, F]
        out.update(features=feats.ravel(), n_mels=feats.shape[0], frames=int(speech.frame_lengths[0]))
    except RowDropped as err:
        out["error"] = str(err)
    except (json.JSONDecodeError, ValueError) as err:
        out["error"] = f"bad_row: {err}"
    return out


@functools.cache
def _feature_extractor(path: str) -> WhisperFeatureExtractor:
    """One feature extractor per worker process (decode tasks reuse their worker)."""
    return WhisperFeatureExtractor.from_pretrained(path)


class SpeechGenerationActor:
    """Ray Data actor: one SpeechLM replica; rows with an error pass through untouched."""

    def __init__(self, blsp_model: str, cfg: EngineConfig, instruction: str, dtype: str = "float32",
                 s3: S3Config | None = None):
        # blsp_model may be s3://: each replica's node makes its own local copy.
        self.speech_lm = SpeechLM.from_checkpoint(local_checkpoint(blsp_model, s3), cfg, dtype=dtype)
        self.instruction = instruction

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        ok = [i for i in range(n) if not batch["error"][i]]
        responses, errors = [""] * n, list(batch["error"])
        if ok:
            feats = [np.asarray(batch["features"][i], np.float32).reshape(int(batch["n_mels"][i]), -1) for i in ok]
            width = max(f.shape[1] for f in feats)
            padded = np.zeros((len(ok), feats[0].shape[0], width), np.float32)  # [B, n_mels, F]; masked by lengths
            for j, f in enumerate(feats):
                padded[j, :, : f.shape[1]] = f
            speech = SpeechBatch(torch.from_numpy(padded), torch.tensor([int(batch["frames"][i]) for i in ok]))
            try:
                gens = self.speech_lm.generate_features(speech, self.instruction)
                for i, g in zip(ok, gens):
                    responses[i] = g.text.strip()
            except Exception as err:  # a batch the model rejects: mark its rows, keep the job going
                log.exception("generation failed for a batch")
                for i in ok:
                    errors[i] = f"generation_failed: {err}"
        return {"index": batch["index"], "source_json": batch["source_json"], "response": responses, "error": errors}


def read_rows(input_file: str, s3: S3Config | None = None) -> list[dict]:
    with open_input(input_file, s3) as f:
        lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace").read().splitlines()
    return [{"index": i, "source_json": line} for i, line in enumerate(lines) if line.strip()]


def run_generate(cfg: BlspRayConfig, input_file: str, output_file: str, blsp_model: str) -> dict:
    """Generate a response for every row of ``input_file``; write ``output_file`` in input order."""
    t0 = time.time()
    gc, s3 = cfg.generate, cfg.cluster.s3
    blsp_model = blsp_model if is_s3(blsp_model) else str(Path(blsp_model).resolve())  # actors run elsewhere
    local = local_checkpoint(blsp_model, s3)  # the driver's copy: audio settings
    _, whisper_path = checkpoint_bases(local)
    meta = adapter_metadata(local)
    pad30 = meta.get("pad_audio_to_30s", False) if meta is not None else cfg.model.pad_audio_to_30s
    rows = read_rows(input_file, s3)
    init_ray(cfg)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * max(1, gc.max_replicas))))
    ds = ds.map(decode_row, fn_kwargs=dict(feature_extractor_path=whisper_path, max_duration_s=cfg.data.max_duration_s,
                                           pad_audio_to_30s=pad30), num_cpus=0.5)
    ds = ds.map_batches(SpeechGenerationActor, fn_constructor_kwargs=dict(blsp_model=blsp_model, cfg=gc, instruction=gc.instruction,
                                                                          dtype=gc.engine_dtype(cfg.model), s3=s3),
                        batch_size=gc.batch_size, compute=engine_pool(gc),
                        num_cpus=gc.cpus_per_replica, num_gpus=gc.gpus_per_replica,
                        resources=dict(gc.resources_per_replica) or None)
    results = sorted(ds.take_all(), key=lambda r: r["index"])
    out_rows, n_err = [], 0
    for r in results:
        try:
            row = json.loads(r["source_json"])
            row = row if isinstance(row, dict) else {"input": row}
        except json.JSONDecodeError:
            row = {"input": r["source_json"]}
        if r["error"]:
            row["error"] = r["error"]
            n_err += 1
        else:
            row["response"] = r["response"]
        out_rows.append(row)
    with open_output(output_file, "w", s3) as f:
        for row in out_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    wall = time.time() - t0
    summary = {"rows": len(out_rows), "ok": len(out_rows) - n_err, "errors": n_err, "wall_s": round(wall, 2),
               "rows_per_s": round(len(out_rows) / wall, 3), "engine": gc.engine, "output": output_file}
    print(f"[generate] {summary['ok']} responses, {n_err} errors, {summary['rows_per_s']} rows/s ({gc.engine}) -> {output_file}",
          flush=True)
    return summary


# ---- entry point: jobs/generate.py ----


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (cluster, generate section); default: local CPU settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--input_file", required=True, help="jsonl rows {\"audio\": path, ...} (local or s3://)")
    p.add_argument("--output_file", required=True)
    p.add_argument("--blsp_model", required=True, help="BLSP checkpoint directory (adapter-only or full; local or s3://)")
    p.add_argument("--instruction", default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    args = p.parse_args()
    if args.config:
        cfg = load_job_config(args)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = config_from_dict({"model": {"lm_path": "", "whisper_path": ""}})  # paths come from --blsp_model
    for key in ("instruction", "max_new_tokens", "temperature", "top_p", "batch_size", "engine"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg.generate, key, value)
    run_generate(cfg, args.input_file, args.output_file, args.blsp_model)
