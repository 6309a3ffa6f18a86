"""The seed's offline preprocessing as a Ray Data job: manifest rows -> stage-2 parquet shards.

Input: jsonl manifests or labelled parquet shards (rows ``audio``, ``text``, ``<target_column>``).
Each input is cut into fixed row ranges of ``rows_per_shard`` rows; a range is one output shard,
named after its input and first row (``<stem>-<hash of input path>-<first row>.parquet``), so a rerun
knows which ranges are done and skips them. Ray Data streams the ranges to ``concurrency`` workers;
each worker reads its range, decodes and validates every clip (16 kHz mono), tokenises
``speech_prompt(instruction, target)`` and writes ``block_rows`` rows at a time into its shard, written
atomically (temp + rename locally, one object on S3). No worker holds more than ``block_rows`` decoded
clips, and the driver only sees per-shard counts, so nothing is materialised.

Every shard carries its own counts (kept, dropped by reason, converted by kind) in its parquet
metadata; the job sums them, skipped shards included, into ``<output>/_summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blsp_ray.model.audio import AudioError, check_duration, decode_audio, parse_audio_spec
from blsp_ray.runtime import init_ray
from blsp_ray.config import BlspRayConfig
from blsp_ray.stages.prepare_asr import probe
from blsp_ray.io.shards import DropReason, Summary, quiet_ray_data
from blsp_ray.io.layout import RunLayout, join
from blsp_ray.io.storage import (
    exists,
    is_s3,
    list_dir,
    open_input,
    open_output,
    write_text,
)
from blsp_ray.cli import job_parser, load_job_config

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("audio", pa.string()),
    ("text", pa.string()),  # transcript
    ("target", pa.string()),  # what the LM learns to say after the speech (the continuation)
    ("duration", pa.float64()),
    ("waveform", pa.list_(pa.float32())),  # 16 kHz mono
    ("prefix_ids", pa.list_(pa.int64())),
    ("suffix_ids", pa.list_(pa.int64())),
    ("suffix_labels", pa.list_(pa.int64())),
])
SUMMARY_KEY = b"blsp_shard_summary"
SUMMARY_FILE = "_summary.json"
SETTINGS_FILE = "_settings.json"


# ---- reading one clip --------------------------------------------------------------------------------


def read_clip(spec: str, min_s: float, max_s: float, rate: int, converted: Counter | None = None) -> np.ndarray:
    """Decode ``path`` or ``path:start:frames`` to mono float32 at ``rate``, validated; raise AudioError.

    Reasons beyond blsp_ray.model.audio's: ``truncated`` (header fine, data shorter than it declares or
    unreadable part-way). Over-long clips are refused from the header, before decoding.
    """
    path, start, frames = parse_audio_spec(spec)
    info = probe(path, spec)  # missing_file / undecodable / empty
    available = info.frames - start
    wanted = frames if frames >= 0 else available
    if wanted <= 0:
        raise AudioError("empty", f"{spec}: no frames to read (file has {info.frames})")
    if wanted > available:
        raise AudioError(DropReason.TRUNCATED, f"{spec}: wants frames up to {start + wanted}, file has {info.frames}")
    if wanted / info.samplerate >= max_s:
        raise AudioError("too_long", f"{spec}: {wanted / info.samplerate:.2f}s >= {max_s}s")
    try:
        samples = decode_audio(path, spec, start, frames, rate)
    except AudioError as err:
        if err.reason != "undecodable":
            raise
        raise AudioError(DropReason.TRUNCATED, f"{spec}: header reads but data does not ({err})") from None
    expected = wanted * rate / info.samplerate
    if len(samples) < 0.99 * expected - 1:
        raise AudioError(DropReason.TRUNCATED, f"{spec}: decoded {len(samples)} samples, header promises {expected:.0f}")
    check_duration(samples, spec, min_s, max_s, rate)
    if converted is not None:
        if info.channels > 1:
            converted["mixed_to_mono"] += 1
        if info.samplerate != rate:
            converted[f"resampled_from_{info.samplerate}"] += 1
    return samples


# ---- planning: inputs -> shards ------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    input: str
    kind: str  # "jsonl" | "parquet"
    start: int  # first row (jsonl: 0-based line number)
    stop: int  # one past the last row
    offset: int  # jsonl: byte offset of line `start`
    name: str  # output file name

    @property
    def label(self) -> str:
        return f"{self.input} rows {self.start}-{self.stop - 1}"


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


def _shard_name(uri: str, start: int) -> str:
    stem = Path(uri.rstrip("/")).name.rsplit(".", 1)[0]
    key = hashlib.sha1(uri.encode()).hexdigest()[:10]
    return f"{stem}-{key}-{start:09d}.parquet"


def plan_shards(files: list[str], rows_per_shard: int, s3=None) -> list[ShardSpec]:
    """Cut every input into row ranges; one pass over each jsonl (line offsets), parquet from its footer."""
    shards = []
    for uri in files:
        if uri.endswith(".parquet"):
            with open_input(uri, s3) as f:
                n = pq.ParquetFile(f).metadata.num_rows
            for start in range(0, n, rows_per_shard):
                shards.append(ShardSpec(uri, "parquet", start, min(n, start + rows_per_shard), 0, _shard_name(uri, start)))
            continue
        offsets, line, pos = [], 0, 0
        with open_input(uri, s3) as f:
            for raw in iter(lambda: f.readline(), b""):
                if line % rows_per_shard == 0:
                    offsets.append((line, pos))
                line += 1
                pos += len(raw)
        for i, (start, off) in enumerate(offsets):
            stop = offsets[i + 1][0] if i + 1 < len(offsets) else line
            shards.append(ShardSpec(uri, "jsonl", start, stop, off, _shard_name(uri, start)))
    return shards


def _jsonl_rows(shard: ShardSpec, s3) -> Iterator[tuple[str, dict | Exception]]:
    with open_input(shard.input, s3) as f:
        f.seek(shard.offset)
        for n in range(shard.start, shard.stop):
            raw = f.readline()
            label = f"{shard.input}:{n + 1}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield label, AudioError(DropReason.BAD_UTF8, f"{label}: line is not valid UTF-8")
                continue
            except json.JSONDecodeError as err:
                yield label, AudioError(DropReason.BAD_ROW, f"{label}: not JSON ({err})")
                continue
            yield label, row


def _parquet_rows(shard: ShardSpec, s3, block_rows: int) -> Iterator[tuple[str, dict | Exception]]:
    with open_input(shard.input, s3) as f:
        pf = pq.ParquetFile(f)
        first, groups, i = 0, [], 0
        for g in range(pf.num_row_groups):  # read only the row groups overlapping [start, stop)
            n = pf.metadata.row_group(g).num_rows
            if first < shard.stop and first + n > shard.start:
                i = first if not groups else i
                groups.append(g)
            first += n
        for batch in pf.iter_batches(batch_size=block_rows, row_groups=groups):
            for row in batch.to_pylist():
                if shard.start <= i < shard.stop:
                    yield f"{shard.input}[{i}]", row
                i += 1


# ---- the worker ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a shard's content depends on; a rerun with other settings must not mix old shards in."""

    inputs: list
    rows_per_shard: int
    instruction: str
    target_column: str
    lm_path: str
    sample_rate: int
    min_duration_s: float
    max_duration_s: float
    max_target_tokens: int | None

    @classmethod
    def of(cls, cfg: BlspRayConfig, inputs: list[str]) -> Settings:
        d = cfg.data
        return cls(inputs, d.rows_per_shard, d.instruction or cfg.stage2.instruction, d.target_column, cfg.model.lm_path,
                   d.sample_rate, d.min_duration_s, d.max_duration_s, d.max_target_tokens)


def _check_str(row: dict, key: str, label: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise AudioError(DropReason.BAD_ROW, f"{label}: no `{key}`")
        return None
    if not isinstance(value, str):
        raise AudioError(DropReason.BAD_ROW, f"{label}: `{key}` is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")  # lone surrogates (\udXXX escapes) cannot be stored
    except UnicodeEncodeError:
        raise AudioError(DropReason.BAD_UTF8, f"{label}: `{key}` is not valid UTF-8") from None
    return value


class ShardProcessor:
    """Turns one shard spec into one parquet shard; loads the tokenizer once per worker."""

    def __init__(self, cfg: BlspRayConfig, settings: Settings, output: str):
        from blsp_ray.model.processing import BlspProcessor

        self.cfg, self.settings, self.output = cfg, settings, output
        self.processor = BlspProcessor.from_paths(cfg.model.lm_path, cfg.model.whisper_path)

    def example(self, label: str, row: dict, converted: Counter) -> dict:
        s = self.settings
        audio = _check_str(row, "audio", label)
        text = _check_str(row, "text", label, required=False) or ""
        target = _check_str(row, s.target_column, label, required=False)
        if target is None or not target.strip():
            raise AudioError(DropReason.NO_TARGET, f"{label}: no `{s.target_column}`")
        ids = self.processor.speech_prompt(s.instruction, target)
        n_target = len(ids["suffix_ids"]) - sum(1 for x in ids["suffix_labels"] if x == -100)
        if s.max_target_tokens is not None and n_target > s.max_target_tokens:
            raise AudioError(DropReason.TARGET_TOO_LONG, f"{label}: {n_target} target tokens > {s.max_target_tokens}")
        waveform = read_clip(audio, s.min_duration_s, s.max_duration_s, s.sample_rate, converted)
        return {"audio": audio, "text": text, "target": target, "duration": len(waveform) / s.sample_rate,
                "waveform": waveform, **ids}

    def rows(self, shard: ShardSpec) -> Iterator[tuple[str, dict | Exception]]:
        if shard.kind == "jsonl":
            return _jsonl_rows(shard, self.cfg.cluster.s3)
        return _parquet_rows(shard, self.cfg.cluster.s3, self.cfg.data.block_rows)

    def write_shard(self, shard: ShardSpec) -> Summary:
        summary = Summary()
        block: list[dict] = []
        with open_output(join(self.output, shard.name), "wb", self.cfg.cluster.s3) as f:
            writer = pq.ParquetWriter(f, SCHEMA)
            for label, row in self.rows(shard):
                try:
                    if isinstance(row, Exception):
                        raise row
                    if not isinstance(row, dict):
                        raise AudioError(DropReason.BAD_ROW, f"{label}: not a JSON object")
                    converted = Counter()
                    block.append(self.example(label, row, converted))
                    summary.converted.update(converted)
                    summary.kept += 1
                except AudioError as err:
                    summary.drop(err.reason, str(err))
                if len(block) >= self.cfg.data.block_rows:
                    writer.write_table(pa.Table.from_pylist(block, SCHEMA))
                    block = []
            if block:
                writer.write_table(pa.Table.from_pylist(block, SCHEMA))
            writer.add_key_value_metadata({SUMMARY_KEY: json.dumps(summary.to_dict())})
            writer.close()
        return summary

    def __call__(self, batch: dict) -> dict:
        """Ray Data map_batches over shard specs (batch_size=1): write each, return its counts."""
        out = {"name": [], "status": [], "summary": []}
        for spec in batch["shard"]:
            shard = ShardSpec(**json.loads(spec))
            t0 = time.time()
            summary = self.write_shard(shard)
            log.info("shard %s: kept %d, dropped %d in %.1fs", shard.name, summary.kept, sum(summary.dropped.values()),
                     time.time() - t0)
            out["name"].append(shard.name)
            out["status"].append("written")
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
    for p in Path(output).glob(".*.parquet.*"):
        p.unlink(missing_ok=True)


def preprocess(cfg: BlspRayConfig, inputs: list[str] | None = None, output: str | None = None) -> dict:
    """Run the preprocessing over ``inputs`` (default: config, else the label stage's shards) into ``output``."""
    import ray

    layout = RunLayout.of(cfg)
    s3 = cfg.cluster.s3
    inputs = inputs or cfg.data.preprocess_inputs or [layout.labels]
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
    done = set(list_dir(output, s3))
    todo = [s for s in shards if s.name not in done]
    summary = Summary()
    for s in shards:  # finished shards count too: the summary covers the whole dataset
        if s.name in done:
            summary.merge(shard_summary(join(output, s.name), s3))
    log.info("preprocess: %d shards, %d already written, %d to do", len(shards), len(shards) - len(todo), len(todo))
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
        first_shard_s = None
        for r in ds.iter_rows():
            first_shard_s = first_shard_s or round(time.time() - t0, 2)
            summary.merge(json.loads(r["summary"]))
    extra = {"seconds_to_first_shard": first_shard_s if todo else None, "output": output, "inputs": files, "shards": len(shards), "shards_written": len(todo),
             "shards_skipped": len(shards) - len(todo), "seconds": round(time.time() - t0, 2)}
    return summary.report("preprocess", join(output, SUMMARY_FILE), extra, s3)


# ---- entry point: jobs/preprocess.py ----


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--input", action="append", help="jsonl / parquet file or dir (default: data.preprocess_inputs, else the label shards)")
    parser.add_argument("--output", help="shard directory (default: data.preprocess_output, else RunLayout.preprocessed)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    preprocess(cfg, args.input, args.output)
