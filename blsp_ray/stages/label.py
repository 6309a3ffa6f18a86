"""Continuation labelling: the stage-1 LM continues every ASR transcript, exactly once, resumably.

The seed ran ``asr_text_generation.py continue_writing`` as hand-started processes over
contiguous manifest ranges. Here one Ray Data job does it:

  shard plan (driver)  ->  read + prompt (CPU tasks)  ->  engine replicas (actor pool)  ->  commit (driver)

* A shard is ``rows_per_shard`` consecutive lines of one manifest, keyed by manifest + first line.
  Its output is ``<labels>/<key>.parquet`` (labelled rows) and then ``<stats>/<key>.json`` (its
  counts); the stats file is the commit marker. Both are written atomically, so a job killed at
  any point leaves whole shards only, and a rerun plans only the shards without a marker.
* Ray Data streams rows from the actors back to the driver, which commits a shard as soon as all
  of its rows are back: work done before a kill is kept, shard by shard.
* The engine (``vllm`` or ``transformers``, see ``blsp_ray.engines``) lives in actors of an
  autoscaling pool ``(min_replicas, max_replicas)``: replicas are added as nodes join.

Why actors owning the engine rather than ``ray.data.llm``: the same ``TextEngine`` serves
labelling, speech inference (prompt embeddings) and the transformers baseline, prompts enter as
token ids counted by the same tokenizer that filters them, and shard-keyed commits need row
identity through the engine stage, which is plain here. vLLM batches each ``map_batches`` call
internally, so throughput is the engine's (see benchmarks/label_throughput.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from blsp_ray.runtime import init_ray
from blsp_ray.config import BlspRayConfig, LabelConfig, S3Config
from blsp_ray.engines import GenerationSettings, TextEngine, build_engine, engine_pool
from blsp_ray.io.layout import RunLayout, join
from blsp_ray.model.prompts import continuation_prompt
from blsp_ray.io.storage import exists, list_dir, local_copy, open_input, open_output
from blsp_ray.cli import job_parser, load_job_config

log = logging.getLogger(__name__)

CONTINUATION = "continuation"
ROW_ID = "label_id"  # "<manifest name>:<line number>": stable across reruns


class Drop:
    """Why a manifest line was not labelled."""

    BAD_ROW = "bad_row"  # not a JSON object
    MISSING_TEXT = "missing_text"  # no "text" key, or not a string
    EMPTY_TEXT = "empty_text"  # empty or whitespace only
    PROMPT_TOO_LONG = "prompt_too_long"  # prompt tokens >= max_prompt_tokens (the seed's filter)


@dataclass(frozen=True)
class Shard:
    key: str
    manifest: str
    start: int  # first line (0-based, counting blank lines too)
    stop: int  # one past the last line

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_key(manifest: str, start: int) -> str:
    stem = PurePosixPath(manifest).stem
    digest = hashlib.sha1(manifest.encode()).hexdigest()[:8]  # two manifests may share a name
    return f"{stem}-{digest}-{start:09d}"


def _lines(manifest: str, s3: S3Config | None) -> list[str]:
    with open_input(manifest, s3) as f:
        return io.TextIOWrapper(f, encoding="utf-8", errors="replace").read().splitlines()


def plan_shards(manifests: list[str], rows_per_shard: int, s3: S3Config | None = None) -> list[Shard]:
    """Fixed line ranges of each manifest: the same manifests always give the same shards."""
    shards = []
    for m in manifests:
        n = len(_lines(m, s3))
        shards += [Shard(shard_key(m, s), m, s, min(s + rows_per_shard, n)) for s in range(0, n, rows_per_shard)]
    return shards


# ---- stage 1: read + prompt (CPU tasks) ------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(lm_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_path)


def prompt_row(line: str, tokenizer, instruction: str, max_prompt_tokens: int) -> tuple[dict | None, list[int] | str]:
    """A manifest line -> (row, prompt ids) or (row or None, drop reason)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None, Drop.BAD_ROW
    if not isinstance(row, dict):
        return None, Drop.BAD_ROW
    text = row.get("text")
    if not isinstance(text, str):
        return row, Drop.MISSING_TEXT
    if not text.strip():
        return row, Drop.EMPTY_TEXT
    ids = tokenizer(continuation_prompt(text.strip(), instruction))["input_ids"]
    if not 0 < len(ids) < max_prompt_tokens:
        return row, Drop.PROMPT_TOO_LONG
    return row, ids


def read_shard(item: dict, lm_path: str, instruction: str, max_prompt_tokens: int, s3: dict | None) -> list[dict]:
    """One shard's lines -> one row per line: kept rows carry prompt ids, dropped rows a reason."""
    shard = Shard(**item)
    s3 = S3Config(**s3) if s3 else None
    tokenizer = _tokenizer(local_copy(lm_path, s3))  # this task's node may not have the checkpoint yet
    name = PurePosixPath(shard.manifest).name
    lines = _lines(shard.manifest, s3)[shard.start : shard.stop]
    out = []
    for i, line in enumerate(lines, start=shard.start):
        base = {"shard": shard.key, ROW_ID: f"{name}:{i}", "source_json": line, "prompt_json": "[]", "drop_reason": ""}
        if not line.strip():
            out.append({**base, "drop_reason": Drop.BAD_ROW})
            continue
        row, ids_or_reason = prompt_row(line, tokenizer, instruction, max_prompt_tokens)
        if isinstance(ids_or_reason, str):
            out.append({**base, "drop_reason": ids_or_reason})
        else:
            out.append({**base, "prompt_json": json.dumps(ids_or_reason)})  # str: one column type in every block
    return out


# ---- stage 2: the engine (actor pool) ---------------------------------------------------------------


class ContinuationLabeller:
    """A Ray Data actor owning one engine replica; labels the kept rows of each batch."""

    def __init__(self, cfg: LabelConfig, lm_path: str, dtype: str = "float32", s3: S3Config | None = None):
        # lm_path may be s3://: each replica's node gets its own local copy (a joining node too).
        self.engine: TextEngine = build_engine(cfg, local_copy(lm_path, s3), GenerationSettings.from_config(cfg), dtype=dtype)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["shard"])
        prompts = [json.loads(p) for p in batch["prompt_json"]]
        keep = [i for i in range(n) if not batch["drop_reason"][i]]
        gens = self.engine.generate_ids([prompts[i] for i in keep])
        texts, tokens, finish = [""] * n, [0] * n, [""] * n
        for i, g in zip(keep, gens):
            texts[i], tokens[i], finish[i] = g.text.strip(), len(g.token_ids), g.finish_reason
        return {
            "shard": batch["shard"],
            ROW_ID: batch[ROW_ID],
            "source_json": batch["source_json"],
            "drop_reason": batch["drop_reason"],
            "prompt_tokens": [len(p) for p in prompts],
            CONTINUATION: texts,
            "generated_tokens": tokens,
            "finish_reason": finish,
        }


# ---- stage 3: commit (driver) ------------------------------------------------------------------------


@dataclass
class ShardStats:
    rows_in: int = 0
    labelled: int = 0
    tokens_generated: int = 0
    dropped: dict | None = None


class ShardWriter:
    """Collects rows per shard and commits a shard once all of its rows have arrived."""

    def __init__(self, shards: list[Shard], labels_dir: str, stats_dir: str, settings_columns: dict, s3: S3Config | None):
        self.expected = {s.key: s.size for s in shards}
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.labels_dir, self.stats_dir, self.s3 = labels_dir, stats_dir, s3
        self.settings_columns = settings_columns
        self.committed = 0

    def add(self, row: dict) -> ShardStats | None:
        key = row["shard"]
        self.pending[key].append(row)
        if len(self.pending[key]) < self.expected[key]:
            return None
        return self._commit(key, self.pending.pop(key))

    def _commit(self, key: str, rows: list[dict]) -> ShardStats:
        rows.sort(key=lambda r: int(r[ROW_ID].rsplit(":", 1)[1]))  # manifest order within a shard
        labelled, dropped = [], Counter()
        for r in rows:
            if r["drop_reason"]:
                dropped[r["drop_reason"]] += 1
                continue
            labelled.append({**json.loads(r["source_json"]), ROW_ID: r[ROW_ID], CONTINUATION: r[CONTINUATION],
                             "prompt_tokens": int(r["prompt_tokens"]), "generated_tokens": int(r["generated_tokens"]),
                             "finish_reason": r["finish_reason"], **self.settings_columns})
        stats = ShardStats(len(rows), len(labelled), sum(r["generated_tokens"] for r in labelled), dict(dropped))
        if labelled:  # a shard whose rows were all dropped has only its stats file
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(labelled), buf)
            with open_output(join(self.labels_dir, f"{key}.parquet"), "wb", self.s3) as f:
                f.write(buf.getvalue())
        with open_output(join(self.stats_dir, f"{key}.json"), "w", self.s3) as f:  # the commit marker
            f.write(json.dumps(asdict(stats)))
        self.committed += 1
        return stats


# ---- the job ------------------------------------------------------------------------------------------


def input_manifests(cfg: BlspRayConfig) -> list[str]:
    """``label.manifests``, else the run's prepared manifests, else ``data.asr_manifests``."""
    if cfg.label.manifests:
        return list(cfg.label.manifests)
    layout = RunLayout.of(cfg)
    prepared = [join(layout.asr_manifests, n) for n in list_dir(layout.asr_manifests, cfg.cluster.s3) if n.endswith(".jsonl")]
    if prepared:
        return prepared
    if cfg.data.asr_manifests:
        return list(cfg.data.asr_manifests)
    raise ValueError(f"no ASR manifests: set label.manifests or data.asr_manifests, or prepare {layout.asr_manifests}")


def labelling_model(cfg: BlspRayConfig) -> str:
    """The stage-1 checkpoint when the run has one, else the configured LM."""
    stage1 = RunLayout.of(cfg).stage1_model
    if exists(join(stage1, "config.json"), cfg.cluster.s3):
        return stage1
    log.info("no stage-1 checkpoint at %s: labelling with model.lm_path %s", stage1, cfg.model.lm_path)
    return cfg.model.lm_path


def stats_dir(cfg: BlspRayConfig) -> str:
    return join(RunLayout.of(cfg).stage("label"), "shard_stats")


def summary_path(cfg: BlspRayConfig) -> str:
    return join(RunLayout.of(cfg).stage("label"), "_summary.json")


def run_label(cfg: BlspRayConfig) -> dict:
    """Label every not-yet-committed shard; print and write the run's summary (all shards)."""
    t0 = time.time()
    lc, s3 = cfg.label, cfg.cluster.s3
    layout = RunLayout.of(cfg)
    manifests = input_manifests(cfg)
    shards = plan_shards(manifests, lc.rows_per_shard, s3)
    done = {n[: -len(".json")] for n in list_dir(stats_dir(cfg), s3) if n.endswith(".json")}
    todo = [s for s in shards if s.key not in done]
    model_path = labelling_model(cfg)  # local path or s3:// URI: the workers make their own local copies
    settings = GenerationSettings.from_config(lc)
    log.info("labelling %d manifests: %d shards, %d already done, %d to do; model %s, engine %s",
             len(manifests), len(shards), len(shards) - len(todo), len(todo), model_path, lc.engine)

    rows_done = tokens_done = 0
    if todo:
        import ray

        init_ray(cfg)
        ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(read_shard, fn_kwargs=dict(lm_path=model_path, instruction=lc.instruction,
                                                     max_prompt_tokens=lc.max_prompt_tokens,
                                                     s3=s3.model_dump() if s3 else None), num_cpus=0.5)
        ds = ds.map_batches(
            ContinuationLabeller,
            fn_constructor_kwargs=dict(cfg=lc, lm_path=model_path, dtype=lc.engine_dtype(cfg.model), s3=s3),
            batch_size=lc.batch_size,
            compute=engine_pool(lc),
            num_cpus=lc.cpus_per_replica,
            num_gpus=lc.gpus_per_replica,
            resources=dict(lc.resources_per_replica) or None,
        )
        writer = ShardWriter(todo, layout.labels, stats_dir(cfg), settings.columns(lc.engine), s3)
        t_run, last = time.time(), time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                rows_done += 1
                tokens_done += int(row["generated_tokens"])
                writer.add(row)
            now = time.time()
            if now - last >= lc.log_every_s:
                el = now - t_run
                log.info("label: %d rows (%.2f rows/s), %d tokens (%.1f tokens/s), %d/%d shards committed",
                         rows_done, rows_done / el, tokens_done, tokens_done / el, writer.committed, len(todo))
                last = now
        if writer.pending:
            raise RuntimeError(f"shards incomplete after the job: {sorted(writer.pending)[:5]}")

    summary = _summarise(cfg, shards, s3)
    summary.update(wall_s=round(time.time() - t0, 2), shards_total=len(shards), shards_this_run=len(todo),
                   rows_this_run=rows_done, tokens_this_run=tokens_done,
                   tokens_per_s_this_run=round(tokens_done / max(time.time() - t0, 1e-9), 2),
                   engine=lc.engine, model=model_path, settings=asdict(settings), output=layout.labels)
    with open_output(summary_path(cfg), "w", s3) as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    print(f"[label] rows in {summary['rows_in']}, labelled {summary['labelled']}, dropped {summary['dropped']}, "
          f"tokens {summary['tokens_generated']}, wall {summary['wall_s']}s "
          f"({len(todo)} of {len(shards)} shards this run) -> {layout.labels}", flush=True)
    return summary


def _summarise(cfg: BlspRayConfig, shards: list[Shard], s3: S3Config | None) -> dict:
    """Totals over every committed shard of the run (this run's and earlier runs')."""
    total, dropped = Counter(), Counter()
    for s in shards:
        path = join(stats_dir(cfg), f"{s.key}.json")
        if not exists(path, s3):
            continue
        with open_input(path, s3) as f:
            st = json.loads(f.read())
        total.update(rows_in=st["rows_in"], labelled=st["labelled"], tokens_generated=st["tokens_generated"], shards_committed=1)
        dropped.update(st["dropped"] or {})
    return {"rows_in": total["rows_in"], "labelled": total["labelled"], "dropped": dict(sorted(dropped.items())),
            "dropped_total": sum(dropped.values()), "tokens_generated": total["tokens_generated"],
            "shards_committed": total["shards_committed"]}


# ---- entry point: jobs/label.py ----


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--manifest", action="append", default=[], help="ASR manifest jsonl (local or s3://); repeatable")
    args = parser.parse_args()
    cfg = load_job_config(args)
    if args.manifest:
        cfg.label.manifests = args.manifest
    run_label(cfg)
