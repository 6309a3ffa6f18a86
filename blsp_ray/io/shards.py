"""What the data jobs share: drop reasons and summaries, Ray Data settings. Files go through blsp_ray.io.storage."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from blsp_ray.config import S3Config
from blsp_ray.io.storage import write_text

log = logging.getLogger(__name__)


class DropReason:
    """Stable codes for dropped rows (audio codes come from blsp_ray.model.audio.AudioError.reason)."""

    BAD_ROW = "bad_row"  # a manifest line that is not a JSON object / lacks a required key
    BAD_UTF8 = "bad_utf8"  # transcript or line that is not valid UTF-8
    NO_TEXT = "no_text"  # transcript empty after normalisation
    NO_TARGET = "no_target"  # labelled row without the target column (or empty)
    TARGET_TOO_LONG = "target_too_long"
    TRUNCATED = "truncated"  # header readable, audio data shorter than declared / unreadable
    # from blsp_ray.model.audio: missing_file, undecodable, empty, non_finite, too_short, too_long


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


# ---- Ray -------------------------------------------------------------------------------------------


def quiet_ray_data() -> None:
    """Progress bars off (logs stay readable in job output); order preserved so outputs are deterministic."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
