"""Speech inference: the original release's ``generate.py`` as a Ray Data batch job.

Rows ``{"audio": path, ...}`` -> decode + check in CPU tasks -> ``SpeechLM`` in an actor pool
(one replica per GPU on clusters) -> rows in input order with ``response`` added (or ``error`` for
a row that could not be used; the rest go on).

Engines: ``vllm`` runs the checkpoint as vLLM's native BLSP model (clips in the prompt, Whisper +
adapter inside the engine, continuous batching); ``transformers`` splices the speech embeddings
into the prompt here and generates left padded. Both greedy by default, and tested to agree.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import ray

from blsp_ray.cli import load_job_config
from blsp_ray.config import BlspRayConfig, GenerateConfig, S3Config, config_from_dict
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.engines import engine_pool, replica_args
from blsp_ray.io.storage import is_s3, open_input, open_output
from blsp_ray.io.shards import Summary
from blsp_ray.model.audio import read_clip
from blsp_ray.runtime import init_ray
from blsp_ray.speech_lm import SpeechLM, local_checkpoint

log = logging.getLogger(__name__)


# ---- the batch job ------------------------------------------------------------------------------------


def decode_row(row: dict, input_file: str, min_duration_s: float, max_duration_s: float) -> dict:
    """CPU task: audio -> 16 kHz mono samples, checked by the one duration rule (Whisper's floor
    included), or the row's drop reason and detail.

    Any failure of this row is the row's error (a named reason where a check names it, else
    ``unexpected_error``); the job goes on with the other rows.
    """
    out = {"line": row["line"], "source_json": row["source_json"], "error_reason": "",
           "error_detail": "", "waveform": np.zeros(0, np.float32)}
    try:
        try:
            item = json.loads(row["source_json"])
        except json.JSONDecodeError as err:
            raise RowDropped(DropReason.BAD_ROW, f"not JSON: {err}") from None
        if not isinstance(item, dict) or not isinstance(item.get("audio"), str):
            raise RowDropped(DropReason.BAD_ROW, 'no string "audio" path')
        out["waveform"] = read_clip(item["audio"], min_duration_s, max_duration_s)  # the duration rule of preprocessing
    except RowDropped as err:
        out.update(error_reason=err.reason.value, error_detail=err.detail)
    except Exception as err:  # noqa: BLE001 - one row's failure, whatever it is, must not end the job
        log.exception("%s:%d: unexpected error decoding the row", input_file, row["line"])
        out.update(error_reason=DropReason.UNEXPECTED.value, error_detail=f"{type(err).__name__}: {err}")
    return out


class SpeechGenerationActor:
    """Ray Data actor: one SpeechLM replica; rows with an error pass through untouched."""

    def __init__(self, blsp_model: str, cfg: GenerateConfig, instruction: str, dtype: str = "float32",
                 s3: S3Config | None = None):
        # blsp_model may be s3://: each replica's node makes its own local copy. A failure here
        # (the engine cannot start) fails the job.
        self.speech_lm = SpeechLM.from_checkpoint(local_checkpoint(blsp_model, s3), cfg, dtype=dtype)
        self.instruction = instruction

    def _generate(self, batch: dict, rows: list[int]) -> list[str]:
        waves = [np.asarray(batch["waveform"][i], np.float32) for i in rows]
        return [g.text.strip() for g in self.speech_lm.generate(waves, self.instruction)]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["line"])
        ok = [i for i in range(n) if not batch["error_reason"][i]]
        responses, reasons, details = [""] * n, list(batch["error_reason"]), list(batch["error_detail"])
        if ok:
            try:
                for i, text in zip(ok, self._generate(batch, ok)):
                    responses[i] = text
            except Exception:  # noqa: BLE001 - find the row(s) that fail; the others still get answers
                log.exception("generation failed for a batch of %d rows; retrying them one at a time", len(ok))
                for i in ok:
                    try:
                        responses[i] = self._generate(batch, [i])[0]
                    except Exception as err:  # noqa: BLE001
                        reasons[i] = DropReason.GENERATION_FAILED.value
                        details[i] = f"{type(err).__name__}: {err}"
        return {"line": batch["line"], "source_json": batch["source_json"], "response": responses,
                "error_reason": reasons, "error_detail": details}


def read_rows(input_file: str, s3: S3Config | None = None) -> list[dict]:
    """The manifest's non-blank lines, each with its 1-based line number (the place errors name)."""
    with open_input(input_file, s3) as f:
        lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace").read().splitlines()
    return [{"line": n, "source_json": line} for n, line in enumerate(lines, start=1) if line.strip()]


def run_generate(cfg: BlspRayConfig, input_file: str, output_file: str, blsp_model: str) -> dict:
    """Generate a response for every row of ``input_file``; write ``output_file`` in input order,
    one row per input row: its fields plus ``response``, or ``error`` and ``error_reason``."""
    t0 = time.time()
    gc, s3 = cfg.generate, cfg.cluster.s3
    blsp_model = blsp_model if is_s3(blsp_model) else str(Path(blsp_model).resolve())  # actors run elsewhere
    rows = read_rows(input_file, s3)
    init_ray(cfg)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * max(1, gc.max_replicas))))
    ds = ds.map(decode_row, fn_kwargs=dict(input_file=input_file, min_duration_s=cfg.data.min_duration_s,
                                           max_duration_s=cfg.data.max_duration_s),
                num_cpus=0.5)
    ds = ds.map_batches(SpeechGenerationActor, fn_constructor_kwargs=dict(blsp_model=blsp_model, cfg=gc, instruction=gc.instruction,
                                                                          dtype=gc.engine_dtype(cfg.model), s3=s3),
                        batch_size=gc.batch_size, compute=engine_pool(gc), **replica_args(gc))
    results = sorted(ds.take_all(), key=lambda r: r["line"])
    out_rows, summary = [], Summary()
    for r in results:
        try:
            row = json.loads(r["source_json"])
            row = row if isinstance(row, dict) else {"input": row}
        except json.JSONDecodeError:
            row = {"input": r["source_json"]}
        if r["error_reason"]:
            err = RowDropped(r["error_reason"], r["error_detail"])
            where = f"{input_file}:{r['line']}"
            row.update(error=f"{err.reason}: {where}: {err.detail}", error_reason=err.reason.value)
            summary.drop(err, where)
        else:
            row["response"] = r["response"]
            summary.kept += 1
        out_rows.append(row)
    with open_output(output_file, "w", s3) as f:
        for row in out_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    wall = time.time() - t0
    result = {"rows": len(out_rows), "ok": summary.kept, "errors": summary.dropped_total,
              "errors_by_reason": dict(sorted(summary.dropped.items())), "wall_s": round(wall, 2),
              "rows_per_s": round(len(out_rows) / wall, 3), "engine": gc.engine, "output": output_file}
    print(f"[generate] {summary.kept} responses, {summary.dropped_total} errors {result['errors_by_reason']}, "
          f"{result['rows_per_s']} rows/s ({gc.engine}) -> {output_file}", flush=True)
    return result


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
