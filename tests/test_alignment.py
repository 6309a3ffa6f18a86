"""Held-out alignment scoring (blsp_ray.heldout) and stage 2's cached encoder outputs, on the tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blsp_ray.config import config_from_dict
from blsp_ray.engines import GenerationSettings, TransformersEngine
from blsp_ray.heldout import HeldoutSet
from blsp_ray.io.storage import read_jsonl, write_jsonl
from blsp_ray.metrics import word_recall
from blsp_ray.model.audio import load_audio
from blsp_ray.model.modeling import build_blsp_from_parts
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.stages.evaluate import TABLE_COLUMNS, run_evaluate
from blsp_ray.speech_lm import SpeechLM
from blsp_ray.stages.stage2 import encoder_outputs


@pytest.fixture(scope="module")
def heldout(tiny_assets, speech_corpus):
    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32).eval()
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    rows = read_jsonl(speech_corpus["heldout"])[:5]
    waves = [load_audio(r["audio"]) for r in rows]
    engine = TransformersEngine(model.llama_model, proc.tokenizer, GenerationSettings(max_new_tokens=8, stop=("###",)), 2)
    return model, proc, rows, waves, HeldoutSet(SpeechLM(model, proc, engine, batch_size=2), rows, waves)


def test_transcript_condition_is_its_own_teacher(heldout):
    model, _, _, _, held = heldout
    scores = held.teacher_forced(None, "transcript")
    assert abs(scores["kl"]) < 1e-6  # KL(transcript || transcript)
    speech = held.teacher_forced(model.speech_adapter, "speech")
    assert speech["kl"] > 1e-3 and speech["nll"] > scores["nll"]  # an untrained adapter is far from the text


def test_shuffled_condition_feeds_another_clip(heldout):
    model, _, _, _, held = heldout
    adapter = model.speech_adapter
    speech, shuffled = held.teacher_forced(adapter, "speech"), held.teacher_forced(adapter, "shuffled")
    assert speech["nll"] != shuffled["nll"]
    embeds, lengths = held._inserted(range(0, 2), "shuffled", adapter)
    expected, _ = adapter(held.hidden[1][None], torch.tensor([held.hidden[1].shape[0]]))
    torch.testing.assert_close(embeds[0, : lengths[0]], expected[0], atol=1e-4, rtol=1e-4)  # row 0 reads clip 1


def test_scores_have_every_table_column(heldout):
    model, _, _, _, held = heldout
    row = held.scores(model.speech_adapter, "speech")
    for key in ("nll", "kl", "chrf", "bleu", "wer", "word_recall", "transcription_nll", "content_word"):
        assert np.isfinite(row[key]), key
    clips = row["per_clip"]
    assert all(len(v) == len(held) for v in clips.values())
    assert row["wer"] == pytest.approx(sum(clips["word_errors"]) / sum(clips["words"]))
    assert row["transcription_nll"] == pytest.approx(sum(clips["transcription_nats"]) / sum(clips["transcription_tokens"]))
    # The continuation NLL per clip sums back to teacher_forced's (the same tokens, another reduction).
    assert row["nll"] == pytest.approx(sum(clips["continuation_nats"]) / sum(clips["continuation_tokens"]), rel=1e-4)
    assert [e["text"] for e in row["examples"]] == held.texts and [e["teacher"] for e in row["examples"]] == held.continuations
    assert len(held.continuations) == len(held) and all(isinstance(c, str) for c in held.continuations)


def test_word_recall():
    assert word_recall("the cat sat on a mat", "The cat sat.") == 1.0
    assert word_recall("a dog", "the cat sat") == 0.0
    assert word_recall("the the cat", "the cat the the") == pytest.approx(3 / 4)  # with multiplicity


def test_cached_encoder_outputs_equal_the_encoder_in_the_step(heldout, tiny_assets):
    """encoder_outputs (a Ray Data step) gives each clip what encode_speech gives it in a batch."""
    model, proc, _, waves, _ = heldout
    out = encoder_outputs({"waveform": np.array(waves, dtype=object), "prefix_ids": np.array([[1]] * len(waves))},
                          str(tiny_assets / "whisper"), pad_audio_to_30s=False, dtype="float32")
    assert "waveform" not in out and len(out["encoder_hidden"]) == len(waves)
    with torch.no_grad():
        hidden, lengths = model.encode_speech(proc.features(waves))
    for i, cached in enumerate(out["encoder_hidden"]):
        assert cached.shape == (int(lengths[i]), hidden.shape[-1])
        torch.testing.assert_close(torch.as_tensor(cached), hidden[i, : int(lengths[i])], atol=1e-5, rtol=1e-5)


def test_evaluate_prints_the_heldout_table(ray_cluster, tiny_assets, speech_corpus, tmp_path):
    """run_evaluate with evaluate.table_rows: the four conditions, as a Ray task on the cluster, in report.md."""
    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
    model.save_adapter(tmp_path / "adapter", tiny_assets / "lm", tiny_assets / "whisper")
    rows = read_jsonl(speech_corpus["heldout"])[:3]
    write_jsonl(tmp_path / "preds.jsonl", [{**r, "response": r["text"]} for r in rows])
    cfg = config_from_dict({
        "cluster": {"address": ray_cluster.dashboard_url},
        "model": {"lm_path": str(tiny_assets / "lm"), "whisper_path": str(tiny_assets / "whisper"), "adapter_inner_dim": 32},
        "label": {"max_new_tokens": 6}, "generate": {"batch_size": 2},
        "evaluate": {"metrics": ["wer", "alignment"], "table_rows": 3, "table_cpus": 0.5},
    })
    report = run_evaluate(cfg, str(tmp_path / "preds.jsonl"), str(tmp_path / "eval"), "text", blsp_model=str(tmp_path / "adapter"))
    table = json.loads((tmp_path / "eval" / "report.json").read_text())["alignment_table"]
    assert table == json.loads(json.dumps(report["alignment_table"]))
    assert table["rows"] == 3 and list(table["conditions"]) == ["untrained adapter", "trained adapter", "shuffled speech", "transcript"]
    assert abs(table["conditions"]["transcript"]["kl"]) < 1e-6
    # The alignment metrics on the same clips are the table's "trained adapter" row: one definition.
    trained = table["conditions"]["trained adapter"]
    assert report["metrics"]["alignment_rows"] == 3
    for metric in ("kl", "nll", "chrf", "bleu"):
        assert report["metrics"][f"alignment_{metric}"] == pytest.approx(trained[metric], rel=1e-4, abs=1e-6), metric
    md = (tmp_path / "eval" / "report.md").read_text()
    assert all(name in md for name in table["conditions"]) and all(col in md for col in TABLE_COLUMNS.values())
    assert "Trained minus shuffled speech (95% bootstrap interval over clips)" in md
    assert table["summary"]["trained_minus_shuffled"]["wer"]["low"] <= table["summary"]["trained_minus_shuffled"]["wer"]["high"]
    assert trained["examples"][0]["text"] in md  # the examples, side by side
