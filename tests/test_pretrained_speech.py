"""BLSP-mini's speech: WordNet's example sentences spoken by espeak-ng and flite voices.

Needs Debian's espeak-ng, flite and wordnet-base (`make setup` installs them).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from blsp_ray.config import ConfigError, SpeechSynthConfig, config_from_dict, load_config
from blsp_ray.demo.corpus import load_sentences, make_sentences, sentence_words, within_vocabulary, wordnet_sentences
from blsp_ray.demo.speech import check_voices, plan_corpus, synthesize_corpus
from blsp_ray.io.storage import read_jsonl

REPO = Path(__file__).resolve().parents[1]
MINI = load_config(REPO / "configs" / "mini.yaml")


def test_wordnet_gives_thousands_of_clean_sentences():
    sentences = wordnet_sentences(MINI.speech.wordnet_dir, MINI.speech.min_words, MINI.speech.max_words)
    assert len(sentences) > 10 * MINI.speech.num_sentences
    assert len({s.lower() for s in sentences}) == len(sentences)
    for s in sentences:
        assert MINI.speech.min_words <= len(s.split()) <= MINI.speech.max_words
        assert re.fullmatch(r"[A-Z][A-Za-z ,;:'!?.-]*[.!?]", s), s  # no digits, brackets or quote marks to read out
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        wordnet_sentences("/nonexistent")


def test_text_source_switch_keeps_the_grammar():
    grammar = SpeechSynthConfig(num_sentences=30, seed=3)
    assert load_sentences(grammar) == make_sentences(30, 3)
    wordnet = SpeechSynthConfig(text_source="wordnet", num_sentences=30, seed=3)
    first = load_sentences(wordnet)
    assert first == load_sentences(wordnet) and first != load_sentences(wordnet.model_copy(update={"seed": 4}))
    with pytest.raises(ValueError, match="asked for 999999 sentences"):
        load_sentences(wordnet.model_copy(update={"num_sentences": 999999}))


def test_closed_vocabulary_keeps_sentences_of_common_words():
    sentences = ["The cat sat.", "The dog sat.", "A cat ran.", "The cat purred loudly."]
    # Counts (once per sentence): the 3, cat 3, sat 2, then dog/a/ran/purred/loudly 1 each (first seen first).
    assert within_vocabulary(sentences, 3) == ["The cat sat."]
    assert within_vocabulary(sentences, 4) == ["The cat sat.", "The dog sat."]
    closed = SpeechSynthConfig(text_source="wordnet", num_sentences=500, vocabulary_size=1500, seed=3)
    chosen = load_sentences(closed)
    vocabulary = {w for s in chosen for w in sentence_words(s)}
    assert len(chosen) == 500 and len(vocabulary) <= 1500
    open_vocabulary = {w for s in load_sentences(closed.model_copy(update={"vocabulary_size": None}))
                       for w in sentence_words(s)}
    assert len(open_vocabulary) > 1500  # the same number of unrestricted sentences use more words
    with pytest.raises(ValueError, match="within its 100 most common words"):
        load_sentences(closed.model_copy(update={"vocabulary_size": 100}))


def test_mini_corpus_plan_splits_sentences_and_voices():
    plan = plan_corpus(MINI.speech)
    train = [p for p in plan if p["split"] == "train"]
    heldout = [p for p in plan if p["split"] == "heldout"]
    assert len(heldout) == round(MINI.speech.num_sentences * MINI.speech.heldout_fraction)
    assert not {p["text"] for p in train} & {p["text"] for p in heldout}
    assert not {p["voice"] for p in train} & {p["voice"] for p in heldout}
    # Several voices of both engines on both sides, each used a fair share; varied speed and pitch.
    for rows, voices in ((train, MINI.speech.train_voices), (heldout, MINI.speech.heldout_voices)):
        counts = Counter(p["voice"] for p in rows)
        assert set(counts) == set(voices) and min(counts.values()) > len(rows) / len(voices) / 2
        assert {v.split(":")[0] for v in counts if ":" in v} == {"flite"} and any(":" not in v for v in counts)
    assert len({p["speed"] for p in plan}) == 3 and len({p["pitch"] for p in plan}) == 3


def test_training_sentences_spoken_by_several_voices():
    cfg = MINI.speech.model_copy(update={"num_sentences": 200, "train_voices_per_sentence": 3})
    plan = plan_corpus(cfg)
    by_text = Counter(p["text"] for p in plan if p["split"] == "train")
    assert set(by_text.values()) == {3}
    for text in by_text:
        rows = [p for p in plan if p["text"] == text]
        assert len({p["voice"] for p in rows}) == 3 and len({p["wav"] for p in rows}) == 3  # distinct voices, files
    assert all(n == 1 for n in Counter(p["text"] for p in plan if p["split"] == "heldout").values())
    with pytest.raises(ValueError, match="train_voices_per_sentence"):
        SpeechSynthConfig(train_voices=["en-us"], heldout_voices=["flite:rms"], train_voices_per_sentence=2)


def test_speech_config_rejects_shared_or_unknown_voices():
    with pytest.raises(ConfigError, match="must differ"):
        config_from_dict({"model": {"lm_path": "x", "whisper_path": "y"},
                          "speech": {"train_voices": ["en-us", "flite:slt"], "heldout_voices": ["espeak-ng:en-us"]}})
    with pytest.raises(ValueError, match="ENGINE:NAME"):
        SpeechSynthConfig(train_voices=["festival:kal"])
    with pytest.raises(ValueError, match=r"unknown TTS voices \['en-us\+nosuch', 'flite:nosuch'\]"):
        check_voices(["en-us+f2", "en-us+nosuch", "flite:nosuch", "flite:rms"])


def test_synthesized_corpus_wordnet_both_engines(tmp_path):
    cfg = SpeechSynthConfig(
        out_dir=str(tmp_path), text_source="wordnet", num_sentences=24, heldout_fraction=0.25,
        train_voices=["en-us+f2", "flite:kal16"], heldout_voices=["en-gb-x-rp+m3", "flite:slt"],
        speeds=[150, 200], pitches=[40, 60], seed=1,
    )
    manifests = synthesize_corpus(cfg)
    train, heldout = read_jsonl(manifests["train"]), read_jsonl(manifests["heldout"])
    assert (len(train), len(heldout)) == (18, 6)
    for row in train + heldout:
        info = sf.info(row["audio"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.duration - row["duration"]) < 1e-3 and 0.5 < row["duration"] < 15
        assert row["source"] == "tts-wordnet" and (row["pitch"] is None) == (row["engine"] == "flite")
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert not {r["voice"] for r in train} & {r["voice"] for r in heldout}
    # A slower rate makes longer audio for the same engine (both engines honour `speeds`).
    slow = cfg.model_copy(update={"out_dir": str(tmp_path / "slow"), "speeds": [120], "heldout_fraction": 0.0})
    fast = cfg.model_copy(update={"out_dir": str(tmp_path / "fast"), "speeds": [240], "heldout_fraction": 0.0,
                                  "num_sentences": 6})
    slow_rows = read_jsonl(synthesize_corpus(slow.model_copy(update={"num_sentences": 6}))["train"])
    fast_rows = read_jsonl(synthesize_corpus(fast)["train"])
    for s, f in zip(slow_rows, fast_rows):
        assert s["text"] == f["text"] and s["voice"] == f["voice"] and s["duration"] > 1.3 * f["duration"]
    # A rerun reuses every wav; a changed setting never reuses a wav made with another voice/speed.
    wavs = {p: p.stat().st_mtime_ns for p in (tmp_path / "wav").iterdir()}
    assert synthesize_corpus(cfg) == manifests
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "wav").iterdir()} == wavs
    changed = read_jsonl(synthesize_corpus(cfg.model_copy(update={"speeds": [175]}))["train"])
    assert not {r["audio"] for r in changed} & {r["audio"] for r in train}
