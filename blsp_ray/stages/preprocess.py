"""Offline preprocessing as a Ray Data job (the original release did it in one process): manifest
rows -> stage-2 parquet shards.

Input: jsonl manifests or labelled parquet shards (rows ``audio``, ``text``, ``<target_column>``),
cut into shards by ``blsp_ray.io.shards`` (``rows_per_shard`` rows each); a shard's output is
``<output>/<shard key>.parquet``, so a rerun knows which shards are done and skips them. Ray Data
streams the shards to ``concurrency`` workers; each worker reads its shard, decodes and validates
every clip (16 kHz mono), tokenises ``speech_prompt(instruction, target)`` and writes ``block_rows``
rows at a time into its output, written atomically (temp + rename locally, one object on S3): the
output file is the shard's commit marker. No worker holds more than ``block_rows`` decoded clips, and
the driver only sees per-shard counts, so nothing is materialised.

Every shard carries its own counts (kept, dropped by reason, converted by kind) in its parquet
metadata; the job sums them, skipped shards included, into ``<output>/_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import BlspRayConfig
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.io.layout import RunLayout, join, run_asr_manifests
from blsp_ray.io.shards import Shard, Summary, committed, plan_shards, quiet_ray_data, read_rows
from blsp_ray.io.storage import exists, is_s3, list_dir, open_input, open_output, write_text
from blsp_ray.model.audio import SAMPLE_RATE, read_clip
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.model.prompts import stage2_task
from blsp_ray.runtime import init_ray

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("audio", pa.string()),
    ("text", pa.string()),  # transcript
    ("task", pa.string()),  # continuation | transcription (``model.prompts.stage2_task``)
    ("target", pa.string()),  # what the LM learns to say after the speech: the continuation, or the transcript
    ("duration", pa.float64()),
    ("waveform", pa.list_(pa.float32())),  # 16 kHz mono
    ("prefix_ids", pa.list_(pa.int64())),
    ("suffix_ids", pa.list_(pa.int64())),
    ("suffix_labels", pa.list_(pa.int64())),
])
SUMMARY_KEY = b"blsp_shard_summary"
SUMMARY_FILE = "_summary.json"
SETTINGS_FILE = "_settings.json"
SHARD_SUFFIX = ".parquet"


def expand_inputs(inputs: list[str], s3=None) -> list[str]:
    """Files of ``inputs``; a directory contributes its ``*.jsonl`` / ``*.parquet`` (not ``.``/``_`` files)."""
    files = []
    for uri in inputs:
        names = list_dir(uri, s3) if is_s3(uri) or os.path.isdir(uri) else None
        if names is None:
            files.append(uri)
        else:
            files += [join(uri, n) for n in names if n.endswith((".jsonl", ".parquet")) and not n.startswith((".", "_"))]
    return files


def shard_file(shard: Shard) -> str:
    """The shard's output (and commit marker) in the output directory."""
    return shard.key + SHARD_SUFFIX


# ---- the worker ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a shard's content and name depend on; a rerun with other settings must not mix old shards in."""

    inputs: list
    rows_per_shard: int
    instruction: str
    target_column: str
    lm_path: str
    sample_rate: int
    min_duration_s: float
    max_duration_s: float
    max_target_tokens: int | None
    transcription_share: float
    transcription_instruction: str
    shard_names: str = "<input stem>-<sha1 of input>[:8]-<first row>"  # blsp_ray.io.shards.shard_key

    @classmethod
    def of(cls, cfg: BlspRayConfig, inputs: list[str]) -> Settings:
        d = cfg.data
        return cls(inputs, d.rows_per_shard, d.instruction or cfg.stage2.instruction, d.target_column, cfg.model.lm_path,
                   SAMPLE_RATE, d.min_duration_s, d.max_duration_s, d.max_target_tokens,
                   cfg.stage2.transcription_share, cfg.stage2.transcription_instruction)


def _check_str(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise RowDropped(DropReason.BAD_ROW, f"no `{key}`")
        return None
    if not isinstance(value, str):
        raise RowDropped(DropReason.BAD_ROW, f"`{key}` is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")  # lone surrogates (\udXXX escapes) cannot be stored
    except UnicodeEncodeError:
        raise RowDropped(DropReason.BAD_UTF8, f"`{key}` is not valid UTF-8") from None
    return value


class ShardProcessor:
    """Turns one shard into one parquet file; loads the tokenizer once per worker."""

    def __init__(self, cfg: BlspRayConfig, settings: Settings, output: str):
        self.cfg, self.settings, self.output = cfg, settings, output
        self.processor = BlspProcessor.from_paths(cfg.model.lm_path, cfg.model.whisper_path, prompt_format=cfg.model.prompt_format)

    def example(self, row: dict, converted: Counter) -> dict:
        """A manifest row -> a stage-2 row (SCHEMA); RowDropped if it cannot be one."""
        s = self.settings
        audio = _check_str(row, "audio")
        text = _check_str(row, "text", required=False) or ""
        task = stage2_task(audio, s.transcription_share)
        column, instruction = ("text", s.transcription_instruction) if task == "transcription" else (s.target_column, s.instruction)
        target = _check_str(row, column, required=False)
        if target is None or not target.strip():
            raise RowDropped(DropReason.NO_TARGET, f"no `{column}` for the {task} task")
        ids = self.processor.speech_prompt(instruction, target)
        n_target = len(ids["suffix_ids"]) - sum(1 for x in ids["suffix_labels"] if x == -100)
        if s.max_target_tokens is not None and n_target > s.max_target_tokens:
            raise RowDropped(DropReason.TARGET_TOO_LONG, f"{n_target} target tokens > {s.max_target_tokens}")
        waveform = read_clip(audio, s.min_duration_s, s.max_duration_s, s.sample_rate, converted)
        return {"audio": audio, "text": text, "task": task, "target": target, "duration": len(waveform) / s.sample_rate,
                "waveform": waveform, **ids}

    def write_shard(self, shard: Shard) -> Summary:
        summary = Summary()
        block: list[dict] = []

        def drop(n: int, err: RowDropped) -> None:
            summary.drop(err, shard.where(n))

        with open_output(join(self.output, shard_file(shard)), "wb", self.cfg.cluster.s3) as f:
            writer = pq.ParquetWriter(f, SCHEMA)
            for n, row in read_rows(shard, self.cfg.cluster.s3, drop, self.cfg.data.block_rows):
                try:
                    converted = Counter()
                    block.append(self.example(row, converted))
                    summary.converted.update(converted)
                    summary.kept += 1
                except RowDropped as err:
                    drop(n, err)
                except Exception as err:  # noqa: BLE001 - whatever one row raises, the shard goes on
                    log.exception("%s: unexpected error", shard.where(n))
                    drop(n, RowDropped(DropReason.UNEXPECTED, f"{type(err).__name__}: {err}"))
                if len(block) >= self.cfg.data.block_rows:
                    writer.write_table(pa.Table.from_pylist(block, SCHEMA))
                    block = []
            if block:
                writer.write_table(pa.Table.from_pylist(block, SCHEMA))
            writer.add_key_value_metadata({SUMMARY_KEY: json.dumps(summary.to_dict())})
            writer.close()
        return summary

    def __call__(self, batch: dict) -> dict:
        """Ray Data map_batches over shards (batch_size=1): write each, return its counts."""
        out = {"key": [], "summary": []}
        for item in batch["shard"]:
            shard = Shard(**json.loads(item))
            t0 = time.time()
            summary = self.write_shard(shard)
            log.info("shard %s: kept %d, dropped %d in %.1fs", shard.key, summary.kept, summary.dropped_total,
                     time.time() - t0)
            out["key"].append(shard.key)
            out["summary"].append(json.dumps(summary.to_dict()))
        return out


def shard_summary(path: str, s3=None) -> dict:
    with open_input(path, s3) as f:
        meta = pq.ParquetFile(f).metadata.metadata or {}
    return json.loads(meta[SUMMARY_KEY])


def _check_settings(output: str, settings: Settings, s3) -> None:
    path = join(output, SETTINGS_FILE)
    mine = asdict(settings)
    if exists(path, s3):
        with open_input(path, s3) as f:
            theirs = json.loads(f.read())
        # Inputs may grow between runs (new label shards): shard names already key on them.
        diff = sorted(k for k in mine if k != "inputs" and mine[k] != theirs.get(k))
        if diff:
            raise ValueError(f"{output} holds shards made with other settings ({', '.join(diff)} differ): "
                             "use another output directory or remove it")
    else:
        write_text(path, json.dumps(mine, indent=2) + "\n", s3)


def _remove_stale_temp_files(output: str) -> None:
    """Temp files a killed run left behind (local only; S3 objects appear only when complete)."""
    if is_s3(output) or not os.path.isdir(output):
        return
    for p in Path(output).glob(f".*{SHARD_SUFFIX}.*"):
        p.unlink(missing_ok=True)


def preprocess(cfg: BlspRayConfig, inputs: list[str] | None = None, output: str | None = None) -> dict:
    """Run the preprocessing over ``inputs`` (default: config, else the label stage's shards, else, when
    no clip is labelled, the run's ASR manifests) into ``output``."""
    layout = RunLayout.of(cfg)
    s3 = cfg.cluster.s3
    inputs = inputs or cfg.data.preprocess_inputs or ([layout.labels] if cfg.labels_continuations() else run_asr_manifests(cfg))
    output = output or cfg.data.preprocess_output or layout.preprocessed
    t0 = time.time()
    files = expand_inputs(inputs, s3)
    if not files:
        raise FileNotFoundError(f"no .jsonl / .parquet inputs in {inputs}")
    settings = Settings.of(cfg, files)
    if not is_s3(output):
        os.makedirs(output, exist_ok=True)
    _check_settings(output, settings, s3)
    _remove_stale_temp_files(output)
    shards = plan_shards(files, cfg.data.rows_per_shard, s3)
    done = committed(shards, output, SHARD_SUFFIX, s3)
    todo = [s for s in shards if s.key not in done]
    summary = Summary()
    for s in shards:  # finished shards count too: the summary covers the whole dataset
        if s.key in done:
            summary.merge(shard_summary(join(output, shard_file(s)), s3))
    log.info("preprocess: %d shards, %d already written, %d to do", len(shards), len(done), len(todo))
    first_shard_s = None
    if todo:
        init_ray(cfg)
        quiet_ray_data()
        ds = ray.data.from_items([{"shard": json.dumps(asdict(s))} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardProcessor,
            fn_constructor_args=(cfg, settings, output),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.data.concurrency),
            num_cpus=cfg.data.cpus_per_worker,
        )
        for r in ds.iter_rows():
            first_shard_s = first_shard_s or round(time.time() - t0, 2)
            summary.merge(json.loads(r["summary"]))
    extra = {"seconds_to_first_shard": first_shard_s, "output": output, "inputs": files, "shards": len(shards),
             "shards_written": len(todo), "shards_skipped": len(done), "seconds": round(time.time() - t0, 2)}
    return summary.report("preprocess", join(output, SUMMARY_FILE), extra, s3)


# ---- entry point: jobs/preprocess.py ----


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--input", action="append", help="jsonl / parquet file or dir (default: data.preprocess_inputs, else the label shards)")
    parser.add_argument("--output", help="shard directory (default: data.preprocess_output, else RunLayout.preprocessed)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    preprocess(cfg, args.input, args.output)
