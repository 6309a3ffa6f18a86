"""Shards: the unit of work, of output and of resume of the data jobs (label, preprocess).

* plan: every input (a jsonl manifest or a parquet file) is cut into shards of ``rows_per_shard``
  consecutive rows. A jsonl is read once, recording each shard's byte range; a parquet file gives
  its row count from its footer. The same inputs always give the same shards.
* key: ``<input stem>-<hash of the input path>-<first row>`` names a shard's output files (two
  inputs may share a stem). A blank line is not a row, but it counts in the line numbers.
* read: a shard's rows, from its byte range only, so reading every shard reads each input once.
  A row that is not a JSON object is a drop, counted where it happens.
* commit: a shard is done once its marker ``<dir>/<key><suffix>`` exists. Markers are written last
  and atomically, so a killed job leaves whole shards only and a rerun does the rest.
* summary: rows kept, rows dropped by ``DropReason`` with the first few drops as examples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow.parquet as pq
import ray

from blsp_ray.config import S3Config
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.io.storage import list_dir, open_input, write_text

log = logging.getLogger(__name__)

JSONL, PARQUET = "jsonl", "parquet"
_PLAN_BUFFER = 1 << 20  # pyarrow's S3 files have no readline and fetch each read separately: read 1 MiB at a time


# ---- plan and key ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    input: str
    kind: str  # JSONL | PARQUET
    start: int  # first row: 0-based line number (blank lines counted) or parquet row
    stop: int  # one past the last row
    offset: int  # jsonl: byte offset of line ``start``; parquet: 0
    nbytes: int  # jsonl: bytes of lines [start, stop); parquet: 0
    rows: int  # rows it holds: its lines that are not blank (parquet: stop - start)
    key: str

    def where(self, n: int) -> str:
        """Row ``n`` (0-based) as people count it: ``file:line`` (1-based), or ``file: row k`` of a parquet file."""
        return f"{self.input}:{n + 1}" if self.kind == JSONL else f"{self.input}: row {n + 1}"


def shard_key(uri: str, start: int) -> str:
    digest = hashlib.sha1(uri.encode()).hexdigest()[:8]
    return f"{PurePosixPath(uri.rstrip('/')).stem}-{digest}-{start:09d}"


def plan_shards(files: list[str], rows_per_shard: int, s3: S3Config | None = None) -> list[Shard]:
    shards = []
    for uri in files:
        if uri.endswith(".parquet"):
            shards += _plan_parquet(uri, rows_per_shard, s3)
        else:
            shards += _plan_jsonl(uri, rows_per_shard, s3)
    return shards


def _plan_parquet(uri: str, rows_per_shard: int, s3: S3Config | None) -> list[Shard]:
    with open_input(uri, s3) as f:
        n = pq.ParquetFile(f).metadata.num_rows
    shards = []
    for start in range(0, n, rows_per_shard):
        stop = min(n, start + rows_per_shard)
        shards.append(Shard(uri, PARQUET, start, stop, 0, 0, stop - start, shard_key(uri, start)))
    return shards


def _plan_jsonl(uri: str, rows_per_shard: int, s3: S3Config | None) -> list[Shard]:
    """One pass over the file: each shard's byte range and number of non-blank lines."""
    shards = []
    start = offset = rows = line = pos = 0

    def close_shard() -> None:
        shards.append(Shard(uri, JSONL, start, line, offset, pos - offset, rows, shard_key(uri, start)))

    with open_input(uri, s3) as raw_file:
        f = raw_file if isinstance(raw_file, io.BufferedIOBase) else io.BufferedReader(raw_file, _PLAN_BUFFER)
        for raw in f:
            if line - start == rows_per_shard:
                close_shard()
                start, offset, rows = line, pos, 0
            rows += bool(raw.strip())
            line += 1
            pos += len(raw)
    if line > start:
        close_shard()
    return shards


# ---- read ----------------------------------------------------------------------------------------------


def read_rows(shard: Shard, s3: S3Config | None, on_drop: Callable[[int, RowDropped], None],
              batch_rows: int = 1024) -> Iterator[tuple[int, dict]]:
    """The shard's rows in order as (row number, row); a line that is not a JSON object goes to ``on_drop``."""
    if shard.kind == PARQUET:
        yield from _parquet_rows(shard, s3, batch_rows)
        return
    with open_input(shard.input, s3) as f:
        f.seek(shard.offset)
        data = f.read(shard.nbytes)
    for n, raw in zip(range(shard.start, shard.stop), data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            yield n, json_row(raw)
        except RowDropped as err:
            on_drop(n, err)


def json_row(raw: bytes) -> dict:
    """One jsonl line -> its object; RowDropped (bad_utf8 / bad_row) if it is not one."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RowDropped(DropReason.BAD_UTF8, "line is not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise RowDropped(DropReason.BAD_ROW, f"not JSON ({err})") from None
    if not isinstance(row, dict):
        raise RowDropped(DropReason.BAD_ROW, f"not a JSON object but a {type(row).__name__}")
    return row


def _parquet_rows(shard: Shard, s3: S3Config | None, batch_rows: int) -> Iterator[tuple[int, dict]]:
    with open_input(shard.input, s3) as f:
        pf = pq.ParquetFile(f)
        groups, first_row, row = [], 0, 0
        for g in range(pf.num_row_groups):  # read only the row groups overlapping [start, stop)
            n = pf.metadata.row_group(g).num_rows
            if row < shard.stop and row + n > shard.start:
                first_row = row if not groups else first_row
                groups.append(g)
            row += n
        i = first_row
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
            for row in batch.to_pylist():
                if shard.start <= i < shard.stop:
                    yield i, row
                i += 1


# ---- commit ----------------------------------------------------------------------------------------------


def committed(shards: list[Shard], marker_dir: str, suffix: str, s3: S3Config | None = None) -> set[str]:
    """Keys of the shards whose commit marker ``<marker_dir>/<key><suffix>`` exists."""
    names = set(list_dir(marker_dir, s3))
    return {s.key for s in shards if s.key + suffix in names}


# ---- summary -----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Counts of a shard or a job: rows kept, rows dropped by reason, clips converted (kept) by kind."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> the first few "where: detail" strings

    def drop(self, err: RowDropped, where: str, keep_examples: int = 5) -> None:
        """Count (and log) the row at ``where`` (``file:line``) as dropped for ``err.reason``."""
        reason = err.reason.value
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < keep_examples:
            ex.append(f"{where}: {err.detail}")
        log.warning("dropped %s: %s", where, err)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: Summary | dict) -> None:
        if isinstance(other, dict):
            other = Summary.from_dict(other)
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.converted.update(other.converted)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, 5 - len(mine))])

    def to_dict(self) -> dict:
        return {
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": self.dropped_total,
            "converted": dict(sorted(self.converted.items())),
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        return cls(d.get("kept", 0), Counter(d.get("dropped", {})), Counter(d.get("converted", {})), dict(d.get("examples", {})))

    def write(self, target: str, extra: dict | None = None, s3: S3Config | None = None) -> dict:
        """Write the counts (and ``extra``) atomically to ``target`` as json; returns what was written."""
        out = {**self.to_dict(), **(extra or {})}
        write_text(target, json.dumps(out, indent=2, ensure_ascii=False) + "\n", s3)
        return out

    def report(self, name: str, target: str, extra: dict | None = None, s3: S3Config | None = None) -> dict:
        """Write the job's summary to ``target`` and print it."""
        out = self.write(target, {"job": name, **(extra or {})}, s3)
        print(f"[{name}] kept {self.kept}, dropped {out['dropped_total']} {out['dropped']}, "
              f"converted {out['converted']} -> {target}", flush=True)
        return out


# ---- Ray -------------------------------------------------------------------------------------------


def quiet_ray_data() -> None:
    """Progress bars off (logs stay readable in job output); order preserved so outputs are deterministic."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
