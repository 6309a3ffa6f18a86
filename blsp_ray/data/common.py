"""What the data jobs share: drop reasons and summaries, atomic outputs (local or s3://), Ray connection."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blsp_ray.config import S3Config
from blsp_ray.storage import atomic_file

log = logging.getLogger(__name__)


class DropReason:
    """Stable codes for dropped rows (audio codes come from blsp_ray.audio.AudioError.reason)."""

    BAD_ROW = "bad_row"  # a manifest line that is not a JSON object / lacks a required key
    BAD_UTF8 = "bad_utf8"  # transcript or line that is not valid UTF-8
    NO_TEXT = "no_text"  # transcript empty after normalisation
    NO_TARGET = "no_target"  # labelled row without the target column (or empty)
    TARGET_TOO_LONG = "target_too_long"
    TRUNCATED = "truncated"  # header readable, audio data shorter than declared / unreadable
    # from blsp_ray.audio: missing_file, undecodable, empty, non_finite, too_short, too_long


@dataclass
class Summary:
    """Counts of one job: rows kept, rows dropped by reason, clips converted (kept) by kind."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few "row: detail" strings

    def drop(self, reason: str, detail: str, keep_examples: int = 5) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < keep_examples:
            ex.append(detail)
        log.warning("dropped (%s): %s", reason, detail)

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
            "dropped_total": sum(self.dropped.values()),
            "converted": dict(sorted(self.converted.items())),
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        return cls(d.get("kept", 0), Counter(d.get("dropped", {})), Counter(d.get("converted", {})), dict(d.get("examples", {})))

    def report(self, name: str, target: str, extra: dict | None = None, s3: S3Config | None = None) -> dict:
        """Print the summary and write it atomically to ``target`` (json)."""
        out = {"job": name, **self.to_dict(), **(extra or {})}
        text = json.dumps(out, indent=2, ensure_ascii=False)
        write_text(target, text + "\n", s3)
        print(f"[{name}] kept {self.kept}, dropped {out['dropped_total']} {out['dropped']}, "
              f"converted {out['converted']} -> {target}", flush=True)
        return out


# ---- files: local paths and s3:// URIs -----------------------------------------------------------


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem(s3: S3Config | None = None):
    from pyarrow import fs

    s3 = s3 or S3Config()
    kwargs = {}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if s3.region:
        kwargs["region"] = s3.region
    return fs.S3FileSystem(**kwargs)


def _s3_key(uri: str) -> str:
    return uri[len("s3://"):]


@contextlib.contextmanager
def open_output(uri: str, mode: str = "w", s3: S3Config | None = None) -> Iterator:
    """Write ``uri`` all-or-nothing: local temp file + rename, or one S3 object (visible only when closed)."""
    if not is_s3(uri):
        with atomic_file(uri, mode) as f:
            yield f
        return
    import io

    with s3_filesystem(s3).open_output_stream(_s3_key(uri)) as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8", write_through=True) if "b" not in mode else raw


@contextlib.contextmanager
def open_input(uri: str, s3: S3Config | None = None) -> Iterator:
    """Binary, seekable input from a local path or s3:// URI."""
    if not is_s3(uri):
        with open(uri, "rb") as f:
            yield f
        return
    with s3_filesystem(s3).open_input_file(_s3_key(uri)) as f:
        yield f


def exists(uri: str, s3: S3Config | None = None) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    from pyarrow import fs

    return s3_filesystem(s3).get_file_info(_s3_key(uri)).type != fs.FileType.NotFound


def list_dir(uri: str, s3: S3Config | None = None) -> list[str]:
    """Names (not paths) of the files directly in ``uri``; [] if it does not exist."""
    if not is_s3(uri):
        return sorted(p.name for p in Path(uri).iterdir() if p.is_file()) if os.path.isdir(uri) else []
    from pyarrow import fs

    infos = s3_filesystem(s3).get_file_info(fs.FileSelector(_s3_key(uri), allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == fs.FileType.File)


def write_text(uri: str, text: str, s3: S3Config | None = None) -> None:
    with open_output(uri, "w", s3) as f:
        f.write(text)


# ---- Ray -------------------------------------------------------------------------------------------


def quiet_ray_data() -> None:
    """Progress bars off (logs stay readable in job output); order preserved so outputs are deterministic."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
