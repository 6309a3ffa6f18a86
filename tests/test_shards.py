"""The one shard mechanism (blsp_ray.io.shards) and the one drop type (blsp_ray.drops): planning and
reading are linear in the manifest, bad rows are counted where they are, with file:line and reason.
No Ray, no model: the labelling reader runs in-process with a stand-in tokenizer."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.io import storage
from blsp_ray.io.shards import Summary, plan_shards, read_rows
from blsp_ray.model.audio import AudioError
from blsp_ray.stages import label

LINES = 200_000
ROWS_PER_SHARD = 1000


class CountingFile(io.FileIO):
    """A file that counts every byte it hands out, however it is read."""

    bytes_read = 0

    def readinto(self, b):
        n = super().readinto(b)
        CountingFile.bytes_read += n or 0
        return n

    def readall(self):
        data = super().readall()
        CountingFile.bytes_read += len(data)
        return data

    def read(self, size=-1):
        data = super().read(size)
        CountingFile.bytes_read += len(data or b"")
        return data


@pytest.fixture
def counted_reads(monkeypatch):
    """Route storage.open_input's local opens through CountingFile; yields a function giving the bytes read."""
    CountingFile.bytes_read = 0
    monkeypatch.setattr(storage, "open", lambda path, mode="rb": io.BufferedReader(CountingFile(path)), raising=False)
    return lambda: CountingFile.bytes_read


class WordTokenizer:
    """Stands in for the LM's tokenizer: one id per word."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] * len(text.split())}


@pytest.fixture
def word_tokenizer(monkeypatch):
    monkeypatch.setattr(label, "_tokenizer", lambda path: WordTokenizer())


def read_label_shard(shard) -> list[dict]:
    return label.read_shard(asdict(shard), lm_path="unused", instruction="Continue:", max_prompt_tokens=64, s3=None)


def test_plan_and_read_are_linear_in_the_manifest(tmp_path, counted_reads, word_tokenizer):
    """Bug 3: labelling re-read the whole manifest for every shard (quadratic in its size)."""
    manifest = tmp_path / "big.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"/clips/{i}.wav", "text": f"row number {i}"}) + "\n"
                                for i in range(LINES)))
    size = manifest.stat().st_size

    shards = label.plan_shards([str(manifest)], ROWS_PER_SHARD)
    assert len(shards) == LINES // ROWS_PER_SHARD
    rows = 0
    for shard in shards:
        out = read_label_shard(shard)
        assert not any(r["drop_reason"] for r in out)
        rows += len(out)
    assert rows == LINES
    read = counted_reads()
    print(f"\nmanifest {size} bytes, {len(shards)} shards: {read} bytes read ({read / size:.2f}x)")
    assert read <= 3 * size  # one planning pass + each shard's own bytes (the old reader: len(shards) x size)


def test_plan_records_byte_ranges_and_rows(tmp_path):
    lines = [b'{"text": "a"}', b"", b'{"text": "bb"}', b'{"text": "ccc"}', b"  ", b'{"text": "d"}', b'{"text": "e"}']
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines))  # no newline after the last line
    shards = plan_shards([str(manifest)], 3)
    assert [(s.start, s.stop, s.rows) for s in shards] == [(0, 3, 2), (3, 6, 2), (6, 7, 1)]
    data = manifest.read_bytes()
    assert [data[s.offset:s.offset + s.nbytes] for s in shards] == [
        b'{"text": "a"}\n\n{"text": "bb"}\n', b'{"text": "ccc"}\n  \n{"text": "d"}\n', b'{"text": "e"}']
    assert len({s.key for s in shards}) == 3 and all(s.key.startswith("m-") for s in shards)
    assert plan_shards([str(manifest)], 3) == shards  # the same input always gives the same shards


def test_parquet_shards(tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)]}), path, row_group_size=3)
    shards = plan_shards([str(path)], 4)
    assert [(s.start, s.stop, s.rows) for s in shards] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    got = [(n, row["text"]) for s in shards for n, row in read_rows(s, None, on_drop=None, batch_rows=2)]
    assert got == [(i, f"t{i}") for i in range(10)]
    assert shards[1].where(5) == f"{path}: row 6"


def test_bad_line_is_dropped_with_its_place(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"text": "a"}\n[1, 2]\n{not json\n\n"caf\xe9"\n{"text": "b"}\n')
    (shard,) = plan_shards([str(manifest)], 100)
    drops = []
    rows = list(read_rows(shard, None, lambda n, err: drops.append((shard.where(n), err.reason))))
    assert rows == [(0, {"text": "a"}), (5, {"text": "b"})]
    assert drops == [(f"{manifest}:2", DropReason.BAD_ROW), (f"{manifest}:3", DropReason.BAD_ROW),
                     (f"{manifest}:5", DropReason.BAD_UTF8)]


def test_label_shard_counts_logs_and_skips_a_bad_row(tmp_path, word_tokenizer, caplog):
    manifest = tmp_path / "asr.jsonl"
    good = [{"audio": f"/clips/{i}.wav", "text": f"clip {i}"} for i in range(5)]
    lines = [json.dumps(r) for r in good]
    lines.insert(2, json.dumps({"audio": "/clips/x.wav", "text": "   "}))  # line 3: nothing to continue
    manifest.write_text("\n".join(lines) + "\n")
    (shard,) = label.plan_shards([str(manifest)], 100)
    rows = read_label_shard(shard)
    for r in rows:  # what the engine replicas add
        r.update(prompt_tokens=len(json.loads(r["prompt_json"])), continuation="" if r["drop_reason"] else "and more",
                 generated_tokens=0 if r["drop_reason"] else 2, finish_reason="" if r["drop_reason"] else "length",
                 generated=not r["drop_reason"])
    writer = label.ShardWriter([shard], str(tmp_path / "labels"), str(tmp_path / "stats"), {"gen_engine": "test"}, None)
    with caplog.at_level(logging.WARNING):
        committed = [s for s in map(writer.add, rows) if s is not None]
    assert len(committed) == 1 and committed[0].kept == 5 and committed[0].dropped == {"empty_text": 1}
    assert any(f"{manifest}:3" in m and "empty_text" in m for m in caplog.messages)
    table = pq.read_table(tmp_path / "labels" / f"{shard.key}.parquet").to_pylist()
    assert [r["audio"] for r in table] == [r["audio"] for r in good]
    stats = json.loads((tmp_path / "stats" / f"{shard.key}.json").read_text())
    assert stats["kept"] == 5 and stats["dropped"] == {"empty_text": 1} and stats["tokens_generated"] == 10
    assert stats["examples"]["empty_text"] == [f"{manifest}:3: `text` is empty"]


def test_summary_counts_and_merges(caplog):
    a, b = Summary(kept=2), Summary(kept=1)
    with caplog.at_level(logging.WARNING):
        a.drop(RowDropped(DropReason.NO_TARGET, "no `continuation`"), "m.jsonl:4")
        b.drop(AudioError(DropReason.TOO_LONG, "x.wav: 40s"), "m.jsonl:9")
    a.merge(b.to_dict())
    assert a.to_dict()["dropped"] == {"no_target": 1, "too_long": 1} and a.kept == 3 and a.dropped_total == 2
    assert caplog.messages == ["dropped m.jsonl:4: no_target: no `continuation`", "dropped m.jsonl:9: too_long: x.wav: 40s"]
    assert a.examples == {"no_target": ["m.jsonl:4: no `continuation`"], "too_long": ["m.jsonl:9: x.wav: 40s"]}


def test_one_drop_type():
    err = AudioError("missing_file", "/clips/x.wav")
    assert isinstance(err, RowDropped) and err.reason is DropReason.MISSING_FILE
    assert str(err) == "missing_file: /clips/x.wav"
    with pytest.raises(TypeError, match="RowDropped"):  # an audio error is about the audio
        AudioError(DropReason.BAD_ROW, "no audio path")
    with pytest.raises(ValueError):  # reasons are one closed set: a typo fails where it is made
        RowDropped("bad-row", "x")


def test_a_drop_crosses_processes_as_itself():
    """Ray pickles a worker's exception to its caller: the error must arrive with its reason and detail."""
    import pickle

    for err in (AudioError("missing_file", "data/x.wav"), RowDropped(DropReason.NO_TARGET, "no `continuation`")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.reason is err.reason and back.detail == err.detail
        assert str(back) == str(err)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path, umask):
    """Atomic writes (temp + rename) give what a plain open()/mkdir would: readable by the group and
    others under the usual 022, not mkstemp's/mkdtemp's owner-only 0600/0700."""
    old = os.umask(umask)
    try:
        storage.write_jsonl(tmp_path / "out" / "rows.jsonl", [{"a": 1}])
        with storage.atomic_dir(tmp_path / "model") as d:
            (d / "weights.bin").write_bytes(b"x")
        with storage.cache_dir(tmp_path / "cache") as d:
            (d / "copy.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "rows.jsonl").stat().st_mode) == 0o666 & ~umask
    for d in ("model", "cache"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o777 & ~umask
        assert stat.S_IMODE(next((tmp_path / d).iterdir()).stat().st_mode) == 0o666 & ~umask


class FragileTokenizer(WordTokenizer):
    """A tokenizer with a bug one row trips (the kind no check names)."""

    def __call__(self, text: str) -> dict:
        if "\u2603" in text:
            raise IndexError("tokenizer bug")
        return super().__call__(text)


def test_any_exception_of_one_row_is_that_rows_drop(tmp_path, monkeypatch):
    monkeypatch.setattr(label, "_tokenizer", lambda path: FragileTokenizer())
    manifest = tmp_path / "asr.jsonl"
    texts = ["one", "two \u2603", "three"]
    manifest.write_text("".join(json.dumps({"audio": f"/c/{i}.wav", "text": t}) + "\n" for i, t in enumerate(texts)))
    (shard,) = label.plan_shards([str(manifest)], 100)
    rows = read_label_shard(shard)
    assert [r["drop_reason"] for r in rows] == ["", "unexpected_error", ""]
    assert rows[1]["drop_detail"] == "IndexError: tokenizer bug"
