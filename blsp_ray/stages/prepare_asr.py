"""LibriSpeech, GigaSpeech and Common Voice in their released layouts -> ASR manifests
``{"audio", "text", "duration", "source", "id"}`` with Whisper's English normalisation.

The driver lists small work units (a LibriSpeech chapter, a GigaSpeech recording, a chunk of a
Common Voice tsv); Ray Data probes the audio headers of each unit in parallel (the slow part on
hundreds of thousands of files) and streams rows back, which the driver writes in order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import soundfile as sf

from blsp_ray.model.audio import AudioError
from blsp_ray.runtime import init_ray
from blsp_ray.config import BlspRayConfig
from blsp_ray.io.shards import DropReason, Summary, quiet_ray_data
from blsp_ray.text import gigaspeech_text, normalize_english
from blsp_ray.io.layout import RunLayout, join
from blsp_ray.io.storage import open_output
from blsp_ray.cli import job_parser, load_job_config

log = logging.getLogger(__name__)

SOURCES = ("librispeech", "gigaspeech", "commonvoice")
_TSV_LINES_PER_UNIT = 2000


def probe(path: str, label: str) -> sf._SoundFileInfo:
    """Header of an audio file; AudioError (missing_file / undecodable / empty) if unusable."""
    if not os.path.exists(path):
        raise AudioError("missing_file", label)
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError("undecodable", f"{label}: {err}") from None
    if info.frames <= 0:
        raise AudioError("empty", label)
    return info


def _decode_line(raw: bytes | str, label: str) -> str:
    """A text line as str; AudioError-like drop for bad UTF-8 (surrogate-escaped or raw bytes)."""
    try:
        if isinstance(raw, bytes):
            return raw.decode("utf-8")
        raw.encode("utf-8")  # surrogateescape'd bytes from the driver fail here
        return raw
    except UnicodeError:
        raise _Drop(DropReason.BAD_UTF8, f"{label}: transcript is not valid UTF-8") from None


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _row(audio: str, text: str, duration: float, source: str, row_id: str, label: str) -> dict:
    norm = normalize_english(text)
    if not norm.strip():
        raise _Drop(DropReason.NO_TEXT, f"{label}: transcript empty after normalisation ({text!r})")
    return {"audio": audio, "text": norm, "duration": round(duration, 4), "source": source, "id": row_id}


# ---- work units (driver side: listing only, no audio touched) --------------------------------------


def librispeech_units(root: str, splits: list[str]) -> Iterator[dict]:
    for split in splits:
        split_dir = Path(root) / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"LibriSpeech split {split!r} not found under {root}")
        for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
            yield {"kind": "librispeech", "trans": str(trans.resolve())}


def gigaspeech_units(root: str, metadata: str, subset: str) -> Iterator[dict]:
    # The released metadata is one JSON document; json.load holds it (about 1-2 GB for XL) on the driver.
    meta_path = Path(root) / metadata
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    for audio in meta.get("audios", []):
        segments = [
            {"sid": s["sid"], "begin_time": s["begin_time"], "end_time": s["end_time"], "text_tn": s.get("text_tn", "")}
            for s in audio.get("segments", [])
            if subset in s.get("subsets", audio.get("subsets", []))
        ]
        if segments:
            yield {"kind": "gigaspeech", "path": str((Path(root) / audio["path"]).resolve()),
                   "sample_rate": audio.get("sample_rate"), "segments": segments}


def commonvoice_units(root: str, tsv: str) -> Iterator[dict]:
    tsv_path = Path(root) / tsv
    with open(tsv_path, "rb") as f:
        header = f.readline().decode("utf-8").rstrip("\r\n").split("\t")
        lines: list[str] = []
        start = 2  # 1-based line number of lines[0]
        for n, raw in enumerate(f, start=2):
            lines.append(raw.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape"))
            if len(lines) == _TSV_LINES_PER_UNIT:
                yield {"kind": "commonvoice", "root": str(Path(root).resolve()), "tsv": str(tsv_path), "header": header,
                       "first_line": start, "lines": lines}
                lines, start = [], n + 1
        if lines:
            yield {"kind": "commonvoice", "root": str(Path(root).resolve()), "tsv": str(tsv_path), "header": header,
                   "first_line": start, "lines": lines}


# ---- rows of a unit (worker side) ---------------------------------------------------------------------


def _librispeech_rows(unit: dict) -> Iterator[dict | _Drop]:
    trans = Path(unit["trans"])
    for n, raw in enumerate(trans.read_bytes().splitlines(), start=1):
        label = f"{trans}:{n}"
        try:
            line = _decode_line(raw, label).strip()
            if not line:
                continue
            utt_id, _, text = line.partition(" ")
            flac = str(trans.parent / f"{utt_id}.flac")
            info = probe(flac, flac)
            yield _row(flac, text, info.frames / info.samplerate, "librispeech", utt_id, label)
        except (AudioError, _Drop) as err:
            yield err if isinstance(err, _Drop) else _Drop(err.reason, str(err))


def _gigaspeech_rows(unit: dict) -> Iterator[dict | _Drop]:
    path = unit["path"]
    try:
        info = probe(path, path)
    except AudioError as err:
        for seg in unit["segments"]:
            yield _Drop(err.reason, f"{seg['sid']}: {err}")
        return
    rate = unit.get("sample_rate") or info.samplerate
    for seg in unit["segments"]:
        label = f"{seg['sid']} ({path})"
        start = round(seg["begin_time"] * rate)
        frames = round((seg["end_time"] - seg["begin_time"]) * rate)
        try:
            if frames <= 0:
                raise _Drop("empty", f"{label}: segment has no frames")
            if start + frames > info.frames:
                raise _Drop(DropReason.TRUNCATED, f"{label}: segment ends at frame {start + frames}, file has {info.frames}")
            yield _row(f"{path}:{start}:{frames}", gigaspeech_text(_decode_line(seg["text_tn"], label)), frames / rate,
                       "gigaspeech", seg["sid"], label)
        except _Drop as err:
            yield err


def _commonvoice_rows(unit: dict) -> Iterator[dict | _Drop]:
    header, clips = unit["header"], Path(unit["root"]) / "clips"
    for n, line in enumerate(unit["lines"], start=unit["first_line"]):
        label = f"{unit['tsv']}:{n}"
        try:
            line = _decode_line(line, label)
            fields = line.split("\t")
            if len(fields) != len(header):
                raise _Drop(DropReason.BAD_ROW, f"{label}: {len(fields)} fields, header has {len(header)}")
            rec = dict(zip(header, fields))
            mp3 = str(clips / rec["path"])
            info = probe(mp3, mp3)
            yield _row(mp3, rec["sentence"], info.frames / info.samplerate, "commonvoice", Path(rec["path"]).stem, label)
        except AudioError as err:
            yield _Drop(err.reason, str(err))
        except _Drop as err:
            yield err


_ROWS = {"librispeech": _librispeech_rows, "gigaspeech": _gigaspeech_rows, "commonvoice": _commonvoice_rows}


def unit_rows(item: dict) -> list[dict]:
    """Ray Data flat_map: one unit -> rows {"row": manifest json or "", "reason", "detail"}."""
    unit = json.loads(item["unit"])
    out = []
    for r in _ROWS[unit["kind"]](unit):
        if isinstance(r, _Drop):
            out.append({"row": "", "reason": r.reason, "detail": r.detail})
        else:
            out.append({"row": json.dumps(r, ensure_ascii=False), "reason": "", "detail": ""})
    return out


# ---- the job --------------------------------------------------------------------------------------------


def source_units(cfg: BlspRayConfig, source: str) -> Iterator[dict]:
    d = cfg.data
    if source == "librispeech" and d.librispeech_dir:
        return librispeech_units(d.librispeech_dir, d.librispeech_splits)
    if source == "gigaspeech" and d.gigaspeech_dir:
        return gigaspeech_units(d.gigaspeech_dir, d.gigaspeech_json, d.gigaspeech_subset)
    if source == "commonvoice" and d.commonvoice_dir:
        return commonvoice_units(d.commonvoice_dir, d.commonvoice_tsv)
    raise ValueError(f"source {source!r}: set data.{source}_dir in the config (sources: {', '.join(SOURCES)})")


def configured_sources(cfg: BlspRayConfig) -> list[str]:
    return [s for s in SOURCES if getattr(cfg.data, f"{s}_dir")]


def manifest_path(cfg: BlspRayConfig, source: str) -> str:
    return join(RunLayout.of(cfg).asr_manifests, f"{source}.jsonl")


def prepare_asr(cfg: BlspRayConfig, source: str, output: str | None = None) -> dict:
    """Write ``<asr manifests>/<source>.jsonl`` and ``<source>.summary.json``; returns the summary."""
    import ray

    output = output or manifest_path(cfg, source)
    units = [{"unit": json.dumps(u, ensure_ascii=False)} for u in source_units(cfg, source)]
    summary = Summary()
    init_ray(cfg)
    quiet_ray_data()
    with open_output(output, "w", cfg.cluster.s3) as out:
        if units:
            ds = ray.data.from_items(units, override_num_blocks=min(len(units), 1000))
            ds = ds.flat_map(unit_rows, num_cpus=cfg.data.cpus_per_worker,
                             compute=ray.data.TaskPoolStrategy(size=cfg.data.concurrency))
            for r in ds.iter_rows():
                if r["row"]:
                    out.write(r["row"] + "\n")
                    summary.kept += 1
                else:
                    summary.drop(r["reason"], r["detail"])
    summary_file = output.rsplit(".", 1)[0] + ".summary.json"
    return summary.report(f"prepare_asr[{source}]", summary_file, {"source": source, "output": output, "units": len(units)},
                          cfg.cluster.s3)


# ---- entry point: jobs/prepare_asr.py ----


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--source", action="append", choices=SOURCES,
                        help="source to prepare (repeatable; default: every source whose data.<source>_dir is set)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    sources = args.source or configured_sources(cfg)
    if not sources:
        raise SystemExit("no ASR source configured: set data.librispeech_dir / gigaspeech_dir / commonvoice_dir")
    for source in sources:
        prepare_asr(cfg, source)
