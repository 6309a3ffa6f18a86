"""LibriSpeech, GigaSpeech and Common Voice in their released layouts -> ASR manifests
``{"audio", "text", "duration", "source", "id"}`` with Whisper's English normalisation.

The driver lists small work units (a LibriSpeech chapter, a GigaSpeech recording, a chunk of a
Common Voice tsv); Ray Data probes the audio headers of each unit in parallel (the slow part on
hundreds of thousands of files) and streams rows back, which the driver writes in order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import ray

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import BlspRayConfig
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.io.layout import RunLayout, join
from blsp_ray.io.shards import Summary, quiet_ray_data
from blsp_ray.io.storage import open_output
from blsp_ray.model.audio import probe
from blsp_ray.runtime import init_ray
from blsp_ray.text import gigaspeech_text, normalize_english

log = logging.getLogger(__name__)

SOURCES = ("librispeech", "gigaspeech", "commonvoice")
_TSV_LINES_PER_UNIT = 2000


def _decode_line(raw: bytes | str) -> str:
    """A text line as str; RowDropped (bad_utf8) for bad UTF-8 (raw bytes, or surrogate-escaped by the driver)."""
    try:
        if isinstance(raw, bytes):
            return raw.decode("utf-8")
        raw.encode("utf-8")  # surrogateescape'd bytes from the driver fail here
        return raw
    except UnicodeError:
        raise RowDropped(DropReason.BAD_UTF8, "transcript is not valid UTF-8") from None


def _kept(audio: str, text: str, duration: float, source: str, row_id: str) -> dict:
    """A manifest row as the workers send it to the driver; RowDropped (no_text) if its transcript normalises away."""
    norm = normalize_english(text)
    if not norm.strip():
        raise RowDropped(DropReason.NO_TEXT, f"transcript empty after normalisation ({text!r})")
    row = {"audio": audio, "text": norm, "duration": round(duration, 4), "source": source, "id": row_id}
    return {"row": json.dumps(row, ensure_ascii=False), "reason": "", "where": "", "detail": ""}


def _dropped(where: str, err: RowDropped) -> dict:
    return {"row": "", "reason": err.reason.value, "where": where, "detail": err.detail}


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
            yield {"kind": "gigaspeech", "metadata": str(meta_path), "path": str((Path(root) / audio["path"]).resolve()),
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


def _librispeech_rows(unit: dict) -> Iterator[dict]:
    trans = Path(unit["trans"])
    for n, raw in enumerate(trans.read_bytes().splitlines(), start=1):
        where = f"{trans}:{n}"
        try:
            line = _decode_line(raw).strip()
            if not line:
                continue
            utt_id, _, text = line.partition(" ")
            flac = str(trans.parent / f"{utt_id}.flac")
            info = probe(flac, flac)
            yield _kept(flac, text, info.frames / info.samplerate, "librispeech", utt_id)
        except RowDropped as err:
            yield _dropped(where, err)


def _gigaspeech_rows(unit: dict) -> Iterator[dict]:
    path = unit["path"]
    try:
        info = probe(path, path)
    except RowDropped as err:
        for seg in unit["segments"]:
            yield _dropped(f"{unit['metadata']}: segment {seg['sid']}", err)
        return
    rate = unit.get("sample_rate") or info.samplerate
    for seg in unit["segments"]:
        where = f"{unit['metadata']}: segment {seg['sid']}"
        start = round(seg["begin_time"] * rate)
        frames = round((seg["end_time"] - seg["begin_time"]) * rate)
        try:
            if frames <= 0:
                raise RowDropped(DropReason.EMPTY, "segment has no frames")
            if start + frames > info.frames:
                raise RowDropped(DropReason.TRUNCATED, f"segment ends at frame {start + frames}, {path} has {info.frames}")
            yield _kept(f"{path}:{start}:{frames}", gigaspeech_text(_decode_line(seg["text_tn"])), frames / rate,
                        "gigaspeech", seg["sid"])
        except RowDropped as err:
            yield _dropped(where, err)


def _commonvoice_rows(unit: dict) -> Iterator[dict]:
    header, clips = unit["header"], Path(unit["root"]) / "clips"
    for n, line in enumerate(unit["lines"], start=unit["first_line"]):
        where = f"{unit['tsv']}:{n}"
        try:
            fields = _decode_line(line).split("\t")
            if len(fields) != len(header):
                raise RowDropped(DropReason.BAD_ROW, f"{len(fields)} fields, header has {len(header)}")
            rec = dict(zip(header, fields))
            mp3 = str(clips / rec["path"])
            info = probe(mp3, mp3)
            yield _kept(mp3, rec["sentence"], info.frames / info.samplerate, "commonvoice", Path(rec["path"]).stem)
        except RowDropped as err:
            yield _dropped(where, err)


_ROWS = {"librispeech": _librispeech_rows, "gigaspeech": _gigaspeech_rows, "commonvoice": _commonvoice_rows}


def unit_rows(item: dict) -> list[dict]:
    """Ray Data flat_map: one unit -> rows {"row": manifest json, or "" and the drop's "reason", "where", "detail"}."""
    unit = json.loads(item["unit"])
    return list(_ROWS[unit["kind"]](unit))


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
                    summary.drop(RowDropped(r["reason"], r["detail"]), r["where"])
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
