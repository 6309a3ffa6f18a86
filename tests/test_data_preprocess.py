"""Offline preprocessing: a corpus with every kind of bad input, crash + rerun, labelled parquet input,
and one end-to-end ``ray job submit``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from blsp_ray.config import config_from_dict
from blsp_ray.io.shards import plan_shards
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.model.prompts import stage2_task
from blsp_ray.stages.preprocess import SCHEMA, SUMMARY_FILE, Settings, ShardProcessor, preprocess, shard_file

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Continue the following text."


def tone(seconds: float, rate: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Manifest with good clips and one row of every bad kind; returns (manifest, good {audio: samples}, bad)."""
    d = tmp_path_factory.mktemp("corpus")
    good: dict[str, int] = {}  # audio spec -> samples expected at 16 kHz
    rows: list[bytes] = []

    def row(audio: str, text: str = "a clip", continuation: str | None = "and then it rained.") -> None:
        r = {"audio": audio, "text": text}
        if continuation is not None:
            r["continuation"] = continuation
        rows.append(json.dumps(r).encode())

    for i, secs in enumerate([0.5, 0.75, 1.0, 1.25]):  # plain 16 kHz mono, float WAV: exact samples
        p = d / f"good{i}.wav"
        sf.write(p, tone(secs, 16000, 200 + 50 * i), 16000, subtype="FLOAT")
        good[str(p)] = round(secs * 16000)
        row(str(p), f"good clip {i}", f"continuation {i}.")
    long_ = d / "long.flac"  # a segment of a longer FLAC, as GigaSpeech rows name them
    sf.write(long_, tone(3.0, 16000), 16000, format="FLAC", subtype="PCM_16")
    good[f"{long_}:16000:12000"] = 12000
    row(f"{long_}:16000:12000")
    stereo = d / "stereo.wav"  # converted (mixed to mono), not dropped
    sf.write(stereo, tone(1.0, 16000, channels=2), 16000)
    good[str(stereo)] = 16000
    row(str(stereo))
    for rate in (8000, 44100):  # resampled
        p = d / f"rate{rate}.wav"
        sf.write(p, tone(1.0, rate), rate)
        good[str(p)] = 16000
        row(str(p))
    mp3 = d / "cv.mp3"
    sf.write(mp3, tone(1.5, 48000), 48000, format="MP3", subtype="MPEG_LAYER_III")
    good[str(mp3)] = 24000
    row(str(mp3))

    bad = {}

    def bad_row(reason: str, audio: str | None = None, raw: bytes | None = None, **kw) -> None:
        bad[reason] = bad.get(reason, 0) + 1
        rows.append(raw) if raw is not None else row(audio, **kw)

    bad_row("missing_file", str(d / "nope.wav"))
    (d / "empty.wav").write_bytes(b"")
    bad_row("undecodable", str(d / "empty.wav"))
    (d / "notaudio.flac").write_text("this is a text file with an audio extension\n")
    bad_row("undecodable", str(d / "notaudio.flac"))
    full = d / "full.flac"
    sf.write(full, tone(2.0, 16000), 16000, format="FLAC", subtype="PCM_16")
    (d / "truncated.flac").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    bad_row("truncated", str(d / "truncated.flac"))
    bad_row("truncated", f"{long_}:40000:16000")  # segment past the end of its file
    for kind, value in (("nan", np.nan), ("inf", np.inf)):
        x = tone(0.5, 16000)
        x[100] = value
        sf.write(d / f"{kind}.wav", x, 16000, subtype="FLOAT")
        bad_row("non_finite", str(d / f"{kind}.wav"))
    sf.write(d / "zero.wav", np.zeros(0, np.float32), 16000)
    bad_row("empty", str(d / "zero.wav"))
    sf.write(d / "blip.wav", tone(0.02, 16000), 16000)
    bad_row("too_short", str(d / "blip.wav"))
    for n in (1, 100, 200, 201):  # at and around Whisper's floor (201 samples), all under min_duration_s
        sf.write(d / f"samples_{n}.wav", np.full(n, 0.1, np.float32), 16000)
        bad_row("too_short", str(d / f"samples_{n}.wav"))
    sf.write(d / "long.wav", tone(4.0, 16000), 16000)
    bad_row("too_long", str(d / "long.wav"))
    bad_row("bad_row", raw=b'{"audio": "x.wav", "text": ')
    bad_row("bad_row", raw=b'["not", "an", "object"]')
    bad_row("bad_utf8", raw=b'{"audio": "' + str(d / "good0.wav").encode() + b'", "text": "caf\xe9", "continuation": "x"}')
    bad_row("no_target", str(d / "good1.wav"), continuation=None)
    rows.insert(5, b"")  # blank lines are not rows
    manifest = d / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(rows) + b"\n")
    return manifest, good, bad


def make_cfg(tiny_assets, ray_cluster=None, **data) -> object:
    return config_from_dict({
        "cluster": {"address": ray_cluster.address if ray_cluster else None, "storage_root": "unused"},
        "model": {"lm_path": str(tiny_assets / "lm"), "whisper_path": str(tiny_assets / "whisper")},
        "data": {"max_duration_s": 3.0, "min_duration_s": 0.1, "rows_per_shard": 5, "block_rows": 2,
                 "concurrency": 2, "instruction": INSTRUCTION, **data},
    })


def read_shards(out: Path) -> pa.Table:
    files = sorted(p for p in out.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files]) if files else SCHEMA.empty_table()


@pytest.fixture(scope="module")
def full_run(corpus, tiny_assets, ray_cluster, tmp_path_factory):
    """The corpus preprocessed uninterrupted: (summary, shard dir)."""
    out = tmp_path_factory.mktemp("full") / "shards"
    return preprocess(make_cfg(tiny_assets, ray_cluster), [str(corpus[0])], str(out)), out


def test_bad_input_corpus(corpus, tiny_assets, full_run):
    manifest, good, bad = corpus
    summary, out = full_run
    assert summary["kept"] == len(good)
    assert summary["dropped"] == bad  # exact counts by reason
    assert summary["converted"] == {"mixed_to_mono": 1, "resampled_from_8000": 1, "resampled_from_44100": 1,
                                    "resampled_from_48000": 1}
    assert json.loads((out / SUMMARY_FILE).read_text())["dropped"] == bad
    assert summary["shards"] == -(-len(manifest.read_bytes().splitlines()) // 5)  # 5 lines per shard

    table = read_shards(out)
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert sorted(r["audio"] for r in rows) == sorted(good)  # every good clip, once
    processor = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    for r in rows:
        assert len(r["waveform"]) == good[r["audio"]], r["audio"]
        assert r["duration"] == pytest.approx(good[r["audio"]] / 16000)
        assert np.isfinite(r["waveform"]).all()
        ids = processor.speech_prompt(INSTRUCTION, r["target"])
        assert (r["prefix_ids"], r["suffix_ids"], r["suffix_labels"]) == (
            ids["prefix_ids"], ids["suffix_ids"], ids["suffix_labels"])
    by_audio = {r["audio"]: r for r in rows}
    g0 = str(manifest.parent / "good0.wav")
    assert by_audio[g0]["target"] == "continuation 0." and by_audio[g0]["text"] == "good clip 0"
    np.testing.assert_array_equal(np.asarray(by_audio[g0]["waveform"], np.float32), tone(0.5, 16000, 200))


def test_crash_between_shards_and_rerun(corpus, tiny_assets, ray_cluster, full_run, tmp_path):
    """A run killed after some shards (plus a half-written temp file) resumes to the uninterrupted output."""
    manifest, good, bad = corpus
    cfg = make_cfg(tiny_assets, ray_cluster)
    (reference, full), crashed = full_run, tmp_path / "crashed"
    shards = sorted(p.name for p in full.glob("*.parquet"))
    # What a crash leaves: the settings, the first shards done, one shard half written to its temp file.
    crashed.mkdir()
    shutil.copy(full / "_settings.json", crashed)
    for name in shards[:2]:
        shutil.copy(full / name, crashed / name)
    (crashed / f".{shards[2]}.k3j2h1").write_bytes((full / shards[2]).read_bytes()[:100])

    resumed = preprocess(cfg, [str(manifest)], str(crashed))
    assert resumed["shards_skipped"] == 2 and resumed["shards_written"] == len(shards) - 2
    assert sorted(os.listdir(crashed)) == sorted(os.listdir(full))  # temp file gone, nothing extra
    for key in ("kept", "dropped", "converted"):
        assert resumed[key] == reference[key]
    assert read_shards(crashed).equals(read_shards(full))
    audios = read_shards(crashed).column("audio").to_pylist()
    assert len(audios) == len(set(audios)) == len(good)

    again = preprocess(cfg, [str(manifest)], str(crashed))  # everything done: nothing rewritten
    assert again["shards_written"] == 0 and again["kept"] == reference["kept"]

    with pytest.raises(ValueError, match="instruction"):  # other settings never mix into old shards
        preprocess(make_cfg(tiny_assets, ray_cluster, instruction="Transcribe."), [str(manifest)], str(crashed))


def test_killed_job_resumes(corpus, tiny_assets, ray_cluster, tmp_path):
    """SIGKILL the real job process once its first shard is out; the rerun completes it, no duplicates."""
    manifest, good, bad = corpus
    cfg = make_cfg(tiny_assets, ray_cluster, rows_per_shard=1, concurrency=1)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.preprocess", "--config", str(cfg_path), "--input", str(manifest), "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        deadline = time.time() + 120
        while not list(out.glob("*.parquet")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    written_before = len(list(out.glob("*.parquet")))
    preprocess(cfg, [str(manifest)], str(out))  # the rerun (in-process: same code, one start-up less)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["kept"] == len(good) and summary["dropped"] == bad
    assert summary["shards_skipped"] >= written_before >= 1
    audios = read_shards(out).column("audio").to_pylist()
    assert sorted(audios) == sorted(good)  # no duplicates, nothing lost
    assert not list(out.glob(".*"))


def test_labelled_parquet_input(corpus, tiny_assets, ray_cluster, tmp_path):
    """The label stage's shards (parquet with `continuation` + extra columns) in, several row groups."""
    manifest, good, _ = corpus
    audios = sorted(good)
    labels = tmp_path / "labels"
    labels.mkdir()
    table = pa.table({"audio": audios, "text": [f"t{i}" for i in range(len(audios))],
                      "continuation": [f"c{i}" for i in range(len(audios))], "temperature": [0.0] * len(audios)})
    pq.write_table(table, labels / "part-0.parquet", row_group_size=3)
    out = tmp_path / "out"
    summary = preprocess(make_cfg(tiny_assets, ray_cluster, rows_per_shard=4, concurrency=1), [str(labels)], str(out))
    assert summary["kept"] == len(audios) and summary["dropped"] == {}
    rows = read_shards(out).to_pylist()
    assert [(r["audio"], r["text"], r["target"]) for r in rows] == [(a, f"t{i}", f"c{i}") for i, a in enumerate(audios)]


def test_target_column_is_configurable(corpus, tiny_assets, tmp_path):
    """Transcripts as targets (ASR-style data); the worker runs in-process here, no Ray needed."""
    manifest, good, _ = corpus
    cfg = make_cfg(tiny_assets, None, target_column="text", rows_per_shard=100)
    worker = ShardProcessor(cfg, Settings.of(cfg, [str(manifest)]), str(tmp_path))
    (shard,) = plan_shards([str(manifest)], 100)
    summary = worker.write_shard(shard)
    assert summary.kept == len(good) + 1  # the row without a continuation has a transcript
    rows = pq.read_table(tmp_path / shard_file(shard)).to_pylist()
    assert all(r["target"] == r["text"] for r in rows)


def test_stage2_task_is_a_stable_share_of_clips():
    paths = [f"/data/clip{i}.wav" for i in range(2000)]
    assert {stage2_task(p, 0.0) for p in paths} == {"continuation"}
    assert {stage2_task(p, 1.0) for p in paths} == {"transcription"}
    picked = [p for p in paths if stage2_task(p, 0.3) == "transcription"]
    assert 0.26 < len(picked) / len(paths) < 0.34  # a hash draw: about the share, not exactly
    assert picked == [p for p in paths if stage2_task(p, 0.3) == "transcription"]  # the same clips every run
    assert set(picked) <= {p for p in paths if stage2_task(p, 0.6) == "transcription"}  # a larger share adds clips


def test_task_mixture_writes_each_rows_prompt_for_its_task(corpus, tiny_assets, tmp_path):
    """stage2.transcription_share: transcription rows learn their transcript under the transcription
    instruction; the others their continuation under the continuation instruction."""
    manifest, good, _ = corpus
    cfg = make_cfg(tiny_assets, None, rows_per_shard=100)
    cfg.stage2.transcription_share = 0.5
    worker = ShardProcessor(cfg, Settings.of(cfg, [str(manifest)]), str(tmp_path))
    (shard,) = plan_shards([str(manifest)], 100)
    worker.write_shard(shard)
    rows = pq.read_table(tmp_path / shard_file(shard)).to_pylist()
    assert {r["task"] for r in rows} == {"continuation", "transcription"}, [r["task"] for r in rows]
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    for r in rows:
        assert r["task"] == stage2_task(r["audio"], 0.5)
        instruction, target = (cfg.stage2.transcription_instruction, r["text"]) if r["task"] == "transcription" else (INSTRUCTION, r["target"])
        assert r["target"] == target
        expected = proc.speech_prompt(instruction, target)
        assert (r["prefix_ids"], r["suffix_ids"]) == (expected["prefix_ids"], expected["suffix_ids"])


@pytest.mark.slow
def test_ray_job_submit_preprocess(corpus, tiny_assets, ray_cluster, tmp_path):
    """As a Ray job, with every clip learning its transcript (stage2.transcription_share: 1): nothing
    is labelled, so the job reads the run's ASR manifests, not the label stage's shards."""
    manifest, good, bad = corpus
    cfg = make_cfg(tiny_assets, None)  # inside the job Ray comes from RAY_ADDRESS
    data = cfg.model_dump(mode="json")
    data["cluster"]["storage_root"], data["cluster"]["run_id"] = str(tmp_path / "runs"), "e2e"
    data["data"]["asr_manifests"] = [str(manifest)]
    data["stage2"]["transcription_share"] = 1.0
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
         "--", sys.executable, "-m", "jobs.preprocess", "--config", str(cfg_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[preprocess] kept" in proc.stdout
    out = tmp_path / "runs" / "e2e" / "preprocess" / "shards"  # RunLayout.preprocessed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    # the row without a continuation has a transcript: a transcription row like the rest
    no_continuation = {k: v for k, v in bad.items() if k != "no_target"}
    assert summary["kept"] == len(good) + 1 and summary["dropped"] == no_continuation
    shards = read_shards(out)
    assert set(shards.column("task").to_pylist()) == {"transcription"}
    assert shards.column("target").to_pylist() == shards.column("text").to_pylist()
