"""Manifest preparation from tiny corpora written in each source's real on-disk layout and format.

soundfile (libsndfile 1.2) writes every format these sources use: FLAC (LibriSpeech), Ogg/Opus
(GigaSpeech) and MP3 (Common Voice), so the fixtures are real files of those formats.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from blsp_ray.model.audio import load_audio
from blsp_ray.config import config_from_dict
from blsp_ray.stages.prepare_alpaca import prepare_alpaca
from blsp_ray.stages.prepare_asr import prepare_asr
from blsp_ray.text import alpaca_instruction, gigaspeech_text, normalize_english
from blsp_ray.io.storage import read_jsonl


def tone(seconds: float, rate: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def cfg_for(tmp_path, **data) -> object:
    return config_from_dict({
        "model": {"lm_path": "unused", "whisper_path": "unused"},
        "cluster": {"storage_root": str(tmp_path / "runs"), "run_id": "t"},
        "data": {"concurrency": 1, **data},
    })


# ---- text rules ---------------------------------------------------------------------------------------


def test_text_rules():
    assert alpaca_instruction("Give three tips for staying healthy", "") == "Give three tips for staying healthy."
    assert alpaca_instruction("Classify the following\u200b", "cat, dog") == "Classify the following. cat, dog"
    assert alpaca_instruction("What is the capital?", "France") == "What is the capital? France"
    assert gigaspeech_text("YOU WALK IN <COMMA> YOU SEE <PERIOD> <MUSIC>") == "YOU WALK IN, YOU SEE."
    # Whisper's English normaliser, offline, spellings included (colour -> color needs the mapping).
    assert normalize_english("Mr. Smith's COLOUR, twenty-one!") == "mister smith is color 21"  # Whisper expands 's


def test_prepare_alpaca(tmp_path):
    src = tmp_path / "alpaca_data.json"
    src.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy", "input": "", "output": "1. Eat well.\n2. Sleep."},
        {"instruction": "Translate to French:", "input": "good\u0007 morning", "output": "bonjour"},
        {"instruction": "Name a colour?", "output": "\ufeffRed"},
        {"instruction": "No output", "input": "", "output": "   "},
        {"instruction": 3, "input": "", "output": "x"},
    ]), encoding="utf-8")
    out = tmp_path / "stage1.jsonl"
    summary = prepare_alpaca(str(src), str(out))
    assert read_jsonl(out) == [
        {"instruction": "Give three tips for staying healthy.", "output": "1. Eat well.\n2. Sleep."},
        {"instruction": "Translate to French: good morning", "output": "bonjour"},
        {"instruction": "Name a colour?", "output": "Red"},
    ]
    assert summary["kept"] == 3 and summary["dropped"] == {"bad_row": 1, "no_text": 1}
    assert json.loads((tmp_path / "stage1.summary.json").read_text())["kept"] == 3


# ---- ASR sources ----------------------------------------------------------------------------------------


def test_librispeech_manifest(tmp_path, ray_cluster):
    root = tmp_path / "LibriSpeech"
    chapter = root / "train-clean-100" / "19" / "198"
    chapter.mkdir(parents=True)
    lengths = {"19-198-0000": 1.0, "19-198-0001": 1.5, "19-198-0003": 0.5}
    for utt, secs in lengths.items():
        sf.write(chapter / f"{utt}.flac", tone(secs, 16000), 16000, format="FLAC", subtype="PCM_16")
    (chapter / "19-198.trans.txt").write_bytes(
        b"19-198-0000 NORTHANGER ABBEY WAS WRITTEN IN THE COLOUR OF MISTER TWENTY\n"
        b"19-198-0001 THIS LITTLE WORK WAS FINISHED IN THE YEAR EIGHTEEN O THREE\n"
        b"19-198-0002 THIS ONE HAS NO AUDIO FILE\n"
        b"19-198-0003 BAD \xff\xfe BYTES\n"
    )
    other = root / "train-clean-100" / "26" / "495"
    other.mkdir(parents=True)
    sf.write(other / "26-495-0000.flac", tone(2.0, 16000), 16000, format="FLAC", subtype="PCM_16")
    (other / "26-495.trans.txt").write_text("26-495-0000 HELLO WORLD\n")
    cfg = cfg_for(tmp_path, librispeech_dir=str(root), librispeech_splits=["train-clean-100"])
    summary = prepare_asr(cfg, "librispeech")
    rows = read_jsonl(tmp_path / "runs/t/data/asr/librispeech.jsonl")
    assert rows == [
        {"audio": str(chapter / "19-198-0000.flac"), "text": "northanger abbey was written in the color of mister 20",
         "duration": 1.0, "source": "librispeech", "id": "19-198-0000"},
        {"audio": str(chapter / "19-198-0001.flac"), "text": "this little work was finished in the year 1803",
         "duration": 1.5, "source": "librispeech", "id": "19-198-0001"},
        {"audio": str(other / "26-495-0000.flac"), "text": "hello world", "duration": 2.0, "source": "librispeech",
         "id": "26-495-0000"},
    ]
    assert summary["kept"] == 3 and summary["dropped"] == {"bad_utf8": 1, "missing_file": 1}
    assert (tmp_path / "runs/t/data/asr/librispeech.summary.json").exists()


def test_gigaspeech_manifest(tmp_path, ray_cluster):
    root = tmp_path / "GigaSpeech"
    (root / "audio/podcast/P0000").mkdir(parents=True)
    pod = tone(6.0, 16000, 330.0)
    sf.write(root / "audio/podcast/P0000/POD0000000001.opus", pod, 16000, format="OGG", subtype="OPUS")
    segments = [
        {"sid": "POD0000000001_S0000000", "begin_time": 0.5, "end_time": 2.25, "subsets": ["{XL}", "{M}"],
         "text_tn": "DOUGLAS MCGRAY IS GOING TO BE OUR GUIDE <COMMA> YOU WALK THROUGH THE DOOR <PERIOD>"},
        {"sid": "POD0000000001_S0000001", "begin_time": 2.5, "end_time": 4.0, "subsets": ["{L}"],
         "text_tn": "NOT IN THE XL SUBSET"},
        {"sid": "POD0000000001_S0000002", "begin_time": 4.0, "end_time": 5.0, "subsets": ["{XL}"],
         "text_tn": "<MUSIC>"},
        {"sid": "POD0000000001_S0000003", "begin_time": 5.0, "end_time": 9.0, "subsets": ["{XL}"],
         "text_tn": "PAST THE END OF THE FILE <QUESTIONMARK>"},
        {"sid": "POD0000000001_S0000004", "begin_time": 4.25, "end_time": 5.75, "subsets": ["{XL}"],
         "text_tn": "ARE YOU SURE <QUESTIONMARK> <SIL>"},
    ]
    meta = {"dataset": "GigaSpeech", "language": "EN", "version": "v1.0.0", "audios": [
        {"aid": "POD0000000001", "path": "audio/podcast/P0000/POD0000000001.opus", "source": "podcast",
         "channels": 1, "sample_rate": 16000, "duration": 6.0, "subsets": ["{XL}", "{L}", "{M}"], "segments": segments},
        {"aid": "POD0000000002", "path": "audio/podcast/P0000/POD0000000002.opus", "sample_rate": 16000,
         "segments": [{"sid": "POD0000000002_S0000000", "begin_time": 0.0, "end_time": 1.0, "subsets": ["{XL}"],
                       "text_tn": "MISSING RECORDING"}]},
    ]}
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    cfg = cfg_for(tmp_path, gigaspeech_dir=str(root))
    summary = prepare_asr(cfg, "gigaspeech")
    rows = read_jsonl(tmp_path / "runs/t/data/asr/gigaspeech.jsonl")
    opus = root / "audio/podcast/P0000/POD0000000001.opus"
    assert rows == [
        {"audio": f"{opus}:8000:28000", "text": "douglas mcgray is going to be our guide you walk through the door",
         "duration": 1.75, "source": "gigaspeech", "id": "POD0000000001_S0000000"},
        {"audio": f"{opus}:68000:24000", "text": "are you sure", "duration": 1.5, "source": "gigaspeech",
         "id": "POD0000000001_S0000004"},
    ]
    assert summary["dropped"] == {"missing_file": 1, "no_text": 1, "truncated": 1}
    # The segment spec reads exactly that stretch of the opus file.
    assert len(load_audio(rows[0]["audio"])) == 28000


def test_commonvoice_manifest(tmp_path, ray_cluster):
    root = tmp_path / "cv-corpus" / "en"
    (root / "clips").mkdir(parents=True)
    sf.write(root / "clips/common_voice_en_1.mp3", tone(2.0, 48000), 48000, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(root / "clips/common_voice_en_2.mp3", tone(1.0, 32000), 32000, format="MP3", subtype="MPEG_LAYER_III")
    (root / "clips/common_voice_en_3.mp3").write_bytes(b"<html>not an mp3</html>")
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment\n"
    (root / "train.tsv").write_bytes((
        header
        + "abc\tcommon_voice_en_1.mp3\tThe colour is \"red\", isn't it?\t2\t0\t\t\t\t\ten\t\n"
        + "abd\tcommon_voice_en_2.mp3\tDr. Who won 3 awards.\t2\t0\t\t\t\t\ten\t\n"
        + "abe\tcommon_voice_en_3.mp3\tNot audio.\t2\t0\t\t\t\t\ten\t\n"
        + "abf\tcommon_voice_en_4.mp3\tNo clip.\t2\t0\t\t\t\t\ten\t\n"
        + "abg\tonly three\tfields\n"
    ).encode() + b"abh\tcommon_voice_en_1.mp3\tbad \xc3\x28 utf8\t2\t0\t\t\t\t\ten\t\n")
    cfg = cfg_for(tmp_path, commonvoice_dir=str(root))
    summary = prepare_asr(cfg, "commonvoice")
    rows = read_jsonl(tmp_path / "runs/t/data/asr/commonvoice.jsonl")
    assert rows == [
        {"audio": str(root / "clips/common_voice_en_1.mp3"), "text": "the color is red is not it", "duration": 2.0,
         "source": "commonvoice", "id": "common_voice_en_1"},
        {"audio": str(root / "clips/common_voice_en_2.mp3"), "text": "doctor who won 3 awards", "duration": 1.0,
         "source": "commonvoice", "id": "common_voice_en_2"},
    ]
    assert summary["dropped"] == {"bad_row": 1, "bad_utf8": 1, "missing_file": 1, "undecodable": 1}


def test_unconfigured_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.gigaspeech_dir"):
        prepare_asr(cfg_for(tmp_path), "gigaspeech")


def test_outputs_to_s3(tmp_path, s3_server):
    """s3:// outputs through pyarrow's S3 filesystem, against a local S3-compatible server on 127.0.0.1."""
    import boto3

    from blsp_ray.config import S3Config
    from blsp_ray.io.storage import exists, list_dir, open_input

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="blsp-data")
    s3 = S3Config(endpoint_url=s3_server, region="us-east-1")
    src = tmp_path / "alpaca_data.json"
    src.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    summary = prepare_alpaca(str(src), "s3://blsp-data/run/data/stage1.jsonl", s3)
    assert summary["kept"] == 1
    assert list_dir("s3://blsp-data/run/data", s3) == ["stage1.jsonl", "stage1.summary.json"]
    with open_input("s3://blsp-data/run/data/stage1.jsonl", s3) as f:
        assert json.loads(f.read()) == {"instruction": "Say hi.", "output": "hi"}
    assert not exists("s3://blsp-data/run/data/other.jsonl", s3)
