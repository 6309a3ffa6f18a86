"""Continuation labelling: the stage-1 LM continues every ASR transcript, exactly once, resumably.

The original release ran ``asr_text_generation.py continue_writing`` as hand-started processes over
contiguous manifest ranges. Here one Ray Data job does it:

  shard plan (driver)  ->  read + prompt (CPU tasks)  ->  engine replicas (actor pool)  ->  commit (driver)

* Shards come from ``blsp_ray.io.shards`` (``rows_per_shard`` consecutive lines of one manifest).
  A shard's output is ``<labels>/<key>.parquet`` (labelled rows) and then ``<stats>/<key>.json``
  (its counts): the stats file is the commit marker. Both are written atomically, so a job killed at
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
import io
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from transformers import AutoTokenizer

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import BlspRayConfig, LabelConfig, S3Config
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.engines import GenerationSettings, TextEngine, build_engine, engine_pool, replica_args
from blsp_ray.io.layout import RunLayout, join, run_asr_manifests
from blsp_ray.io.shards import Shard, Summary, committed, plan_shards, read_rows
from blsp_ray.io.storage import exists, local_copy, open_input, open_output
from blsp_ray.model.prompts import PromptFormat, continuation_prompt, make_prompt_format, stage2_task
from blsp_ray.runtime import init_ray

log = logging.getLogger(__name__)

CONTINUATION = "continuation"
ROW_ID = "label_id"  # "<manifest name>:<0-based line number>": stable across reruns
STATS_SUFFIX = ".json"


# ---- stage 1: read + prompt (CPU tasks) ------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(lm_path: str):
    return AutoTokenizer.from_pretrained(lm_path)


def prompt_ids(row: dict, tokenizer, prompts: PromptFormat, instruction: str, max_prompt_tokens: int) -> list[int]:
    """A manifest row -> the token ids of its continuation prompt; RowDropped if it has none."""
    text = row.get("text")
    if not isinstance(text, str):
        raise RowDropped(DropReason.MISSING_TEXT, "no string `text`")
    if not text.strip():
        raise RowDropped(DropReason.EMPTY_TEXT, "`text` is empty")
    ids = tokenizer(continuation_prompt(prompts, text.strip(), instruction))["input_ids"]
    if not 0 < len(ids) < max_prompt_tokens:
        raise RowDropped(DropReason.PROMPT_TOO_LONG, f"{len(ids)} prompt tokens, label.max_prompt_tokens is {max_prompt_tokens}")
    return ids


def read_shard(item: dict, lm_path: str, instruction: str, max_prompt_tokens: int, s3: dict | None,
               transcription_share: float = 0.0, prompt_format: str = "original") -> list[dict]:
    """One shard -> one row per row of it: kept rows carry prompt ids, dropped rows a reason and its
    detail. Rows stage 2 trains on the transcription task (``stage2_task``) are kept without a
    prompt: their target is their transcript, so the engine never sees them."""
    shard = Shard(**item)
    s3 = S3Config(**s3) if s3 else None
    tokenizer = _tokenizer(local_copy(lm_path, s3))  # this task's node may not have the checkpoint yet
    prompts = make_prompt_format(prompt_format, tokenizer)
    name = PurePosixPath(shard.input).name
    out = []

    def base(n: int, row: dict | None) -> dict:
        return {"shard": shard.key, ROW_ID: f"{name}:{n}", "source_json": json.dumps(row) if row is not None else "",
                "prompt_json": "[]", "drop_reason": "", "drop_detail": ""}

    def drop(n: int, err: RowDropped, row: dict | None = None) -> None:
        out.append({**base(n, row), "drop_reason": err.reason.value, "drop_detail": err.detail})

    for n, row in read_rows(shard, s3, drop):
        try:
            ids = prompt_ids(row, tokenizer, prompts, instruction, max_prompt_tokens)
            if isinstance(row.get("audio"), str) and stage2_task(row["audio"], transcription_share) == "transcription":
                ids = []
        except RowDropped as err:
            drop(n, err, row)
            continue
        except Exception as err:  # noqa: BLE001 - whatever one row raises, the shard goes on
            log.exception("%s: unexpected error", shard.where(n))
            drop(n, RowDropped(DropReason.UNEXPECTED, f"{type(err).__name__}: {err}"), row)
            continue
        out.append({**base(n, row), "prompt_json": json.dumps(ids)})  # str: one column type in every block
    return out


# ---- stage 2: the engine (actor pool) ---------------------------------------------------------------


class ContinuationLabeller:
    """A Ray Data actor owning one engine replica; labels the kept rows of each batch. ``__call__`` is
    a coroutine, so Ray Data keeps ``label.calls_in_flight`` calls on the replica at once and the
    engine batches their prompts together (``TextEngine.generate_ids_async``)."""

    def __init__(self, cfg: LabelConfig, lm_path: str, dtype: str = "float32", s3: S3Config | None = None):
        # lm_path may be s3://: each replica's node gets its own local copy (a joining node too).
        self.engine: TextEngine = build_engine(cfg, local_copy(lm_path, s3), GenerationSettings.from_config(cfg), dtype=dtype)

    async def __call__(self, batch: dict) -> dict:
        n = len(batch["shard"])
        prompts = [json.loads(p) for p in batch["prompt_json"]]
        keep = [i for i in range(n) if not batch["drop_reason"][i] and prompts[i]]  # no prompt: a transcription row
        # Greedy decoding continues identical prompts identically, so each distinct prompt of the batch
        # is generated once (a sentence spoken by several voices is one prompt); sampling draws per row.
        greedy = self.engine.settings.greedy
        source = {}  # row -> the first row of the batch with its prompt (when sampling: itself)
        first: dict = {}  # prompt (when sampling: row) -> the first row that reads it
        for i in keep:
            source[i] = first.setdefault(tuple(prompts[i]) if greedy else i, i)
        generating = list(first.values())
        gens = dict(zip(generating, await self.engine.generate_ids_async([prompts[i] for i in generating])))
        texts, tokens, finish, generated = [""] * n, [0] * n, [""] * n, [False] * n
        for i in keep:
            g = gens[source[i]]
            texts[i], tokens[i], finish[i], generated[i] = g.text.strip(), len(g.token_ids), g.finish_reason, source[i] == i
        return {
            "shard": batch["shard"],
            ROW_ID: batch[ROW_ID],
            "source_json": batch["source_json"],
            "drop_reason": batch["drop_reason"],
            "drop_detail": batch["drop_detail"],
            "prompt_tokens": [len(p) for p in prompts],
            CONTINUATION: texts,
            "generated_tokens": tokens,
            "finish_reason": finish,
            # The engine continued this row's prompt (False: dropped, a transcription row, or the same
            # prompt earlier in the batch, whose continuation this row carries).
            "generated": generated,
        }


# ---- stage 3: commit (driver) ------------------------------------------------------------------------


def _line(row: dict) -> int:
    return int(row[ROW_ID].rsplit(":", 1)[1])


class ShardWriter:
    """Collects rows per shard and commits a shard once all of its rows have arrived."""

    def __init__(self, shards: list[Shard], labels_dir: str, stats_dir: str, settings_columns: dict, s3: S3Config | None):
        self.shards = {s.key: s for s in shards}
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.labels_dir, self.stats_dir, self.s3 = labels_dir, stats_dir, s3
        self.settings_columns = settings_columns
        self.committed = 0

    def add(self, row: dict) -> Summary | None:
        key = row["shard"]
        self.pending[key].append(row)
        if len(self.pending[key]) < self.shards[key].rows:
            return None
        return self.commit(self.shards[key], self.pending.pop(key))

    def commit(self, shard: Shard, rows: list[dict]) -> Summary:
        """Write the shard's labelled rows, then its counts (the commit marker)."""
        rows.sort(key=_line)  # manifest order within a shard
        summary, labelled = Summary(), []
        for r in rows:
            if r["drop_reason"]:
                summary.drop(RowDropped(r["drop_reason"], r["drop_detail"]), shard.where(_line(r)))
                continue
            labelled.append({**json.loads(r["source_json"]), ROW_ID: r[ROW_ID], CONTINUATION: r[CONTINUATION],
                             "prompt_tokens": int(r["prompt_tokens"]), "generated_tokens": int(r["generated_tokens"]),
                             "finish_reason": r["finish_reason"], **self.settings_columns})
        summary.kept = len(labelled)
        if labelled:  # a shard whose rows were all dropped has only its stats file
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(labelled), buf)
            with open_output(join(self.labels_dir, f"{shard.key}.parquet"), "wb", self.s3) as f:
                f.write(buf.getvalue())
        generations = sum(1 for r in rows if r["generated"])
        summary.write(join(self.stats_dir, shard.key + STATS_SUFFIX),
                      {"tokens_generated": sum(r["generated_tokens"] for r in labelled), "generations": generations}, self.s3)
        self.committed += 1
        return summary


# ---- the job ------------------------------------------------------------------------------------------


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


def labelling_config(cfg: BlspRayConfig) -> LabelConfig:
    """``cfg.label``, generating no more tokens than stage 2 reads of a continuation
    (``stage2.continuation_tokens``): a continuation's first N tokens are the same whether or not
    more follow, and the rest would be generated only to be cut off."""
    lc, read = cfg.label, cfg.stage2.continuation_tokens
    if read is None or read >= lc.max_new_tokens:
        return lc
    log.info("labelling generates %d tokens a row, not label.max_new_tokens=%d: stage 2 reads the first %d "
             "(stage2.continuation_tokens)", read, lc.max_new_tokens, read)
    return lc.model_copy(update={"max_new_tokens": read})


def run_label(cfg: BlspRayConfig) -> dict:
    """Label every not-yet-committed shard; print and write the run's summary (all shards)."""
    t0 = time.time()
    lc, s3 = labelling_config(cfg), cfg.cluster.s3
    layout = RunLayout.of(cfg)
    manifests = run_asr_manifests(cfg)
    shards = plan_shards(manifests, lc.rows_per_shard, s3)
    done = committed(shards, stats_dir(cfg), STATS_SUFFIX, s3)
    todo = [s for s in shards if s.key not in done]
    model_path = labelling_model(cfg)  # local path or s3:// URI: the workers make their own local copies
    settings = GenerationSettings.from_config(lc)
    log.info("labelling %d manifests: %d shards, %d already done, %d to do; model %s, engine %s",
             len(manifests), len(shards), len(done), len(todo), model_path, lc.engine)

    writer = ShardWriter(todo, layout.labels, stats_dir(cfg), settings.columns(lc.engine), s3)
    for s in todo:
        if not s.rows:  # blank lines only: nothing to label, committed as it is
            writer.commit(s, [])
    with_rows = [s for s in todo if s.rows]
    rows_done = tokens_done = 0
    if with_rows:
        init_ray(cfg)
        ds = ray.data.from_items([asdict(s) for s in with_rows], override_num_blocks=len(with_rows))
        ds = ds.flat_map(read_shard, fn_kwargs=dict(lm_path=model_path, instruction=lc.instruction,
                                                     max_prompt_tokens=lc.max_prompt_tokens,
                                                     s3=s3.model_dump() if s3 else None,
                                                     transcription_share=cfg.stage2.transcription_share,
                                                     prompt_format=cfg.model.prompt_format), num_cpus=0.5)
        ds = ds.map_batches(
            ContinuationLabeller,
            fn_constructor_kwargs=dict(cfg=lc, lm_path=model_path, dtype=lc.engine_dtype(cfg.model), s3=s3),
            batch_size=lc.batch_size,
            # Only vLLM batches calls together; the transformers engine runs them one at a time anyway.
            compute=engine_pool(lc, lc.calls_in_flight if lc.engine == "vllm" else None),
            **replica_args(lc),
        )
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

    total, tokens, generations, n_committed = _summarise(cfg, shards, s3)
    extra = dict(rows_in=total.kept + total.dropped_total, labelled=total.kept, generations=generations, tokens_generated=tokens,
                 shards_committed=n_committed, wall_s=round(time.time() - t0, 2), shards_total=len(shards),
                 shards_this_run=len(todo), rows_this_run=rows_done, tokens_this_run=tokens_done,
                 tokens_per_s_this_run=round(tokens_done / max(time.time() - t0, 1e-9), 2),
                 engine=lc.engine, model=model_path, settings=asdict(settings), output=layout.labels)
    summary = total.write(summary_path(cfg), extra, s3)
    print(f"[label] rows in {summary['rows_in']}, labelled {summary['labelled']}, dropped {summary['dropped']}, "
          f"tokens {summary['tokens_generated']}, wall {summary['wall_s']}s "
          f"({len(todo)} of {len(shards)} shards this run) -> {layout.labels}", flush=True)
    return summary


def _summarise(cfg: BlspRayConfig, shards: list[Shard], s3: S3Config | None) -> tuple[Summary, int, int, int]:
    """Totals over every committed shard of the run (this run's and earlier runs'): counts, tokens,
    generations (distinct prompts the engine continued), shards."""
    total, tokens, generations, n = Summary(), 0, 0, 0
    done = committed(shards, stats_dir(cfg), STATS_SUFFIX, s3)
    for s in shards:
        if s.key not in done:
            continue
        with open_input(join(stats_dir(cfg), s.key + STATS_SUFFIX), s3) as f:
            stats = json.loads(f.read())
        total.merge(stats)
        tokens += stats["tokens_generated"]
        generations += stats.get("generations", stats["kept"])  # stats without the count: one generation per kept row
        n += 1
    return total, tokens, generations, n


# ---- entry point: jobs/label.py ----


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--manifest", action="append", default=[], help="ASR manifest jsonl (local or s3://); repeatable")
    args = parser.parse_args()
    cfg = load_job_config(args)
    if args.manifest:
        cfg.label.manifests = args.manifest
    run_label(cfg)
