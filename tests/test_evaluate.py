"""Evaluation metrics against values computed by hand on small fixed examples."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blsp_ray.config import config_from_dict
from blsp_ray.metrics import text_metrics
from blsp_ray.stages.evaluate import alignment_scores, mean_token_kl, run_evaluate
from blsp_ray.io.storage import write_jsonl


def test_wer_cer_by_hand():
    # corpus WER = word edits / reference words: 1 substitution ("sat"->"sit") over 3 + 2 words
    m = text_metrics(["the cat sit", "hello world"], ["the cat sat", "hello world"], ("wer", "cer"))
    assert m["wer"] == pytest.approx(1 / 5)
    # corpus CER = char edits / reference chars: "abcd"->"abed" is 1 substitution over 4 + 2 chars
    assert text_metrics(["abed", "xy"], ["abcd", "xy"], ("cer",))["cer"] == pytest.approx(1 / 6)
    assert text_metrics(["a b"], ["a b c d"], ("wer",))["wer"] == pytest.approx(2 / 4)  # two deletions


def test_bleu_chrf_by_hand():
    same = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], ("bleu", "chrf"))
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    # "a b c d" vs "a b c e": n-gram precisions 3/4, 2/3, 1/2 and 0/1 -> sacrebleu's exp smoothing
    # gives 1/(2*1) for the zero count; brevity penalty 1 (same length).
    expected = math.exp(sum(math.log(p) for p in (3 / 4, 2 / 3, 1 / 2, 1 / 2)) / 4) * 100
    assert text_metrics(["a b c d"], ["a b c e"], ("bleu",))["bleu"] == pytest.approx(expected, abs=1e-6)
    assert text_metrics(["xyz"], ["abc"], ("chrf",))["chrf"] == pytest.approx(0.0)


def test_token_kl_by_hand():
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2), (3/4, 1/4)
    student = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # q = (3/4, 1/4) twice
    kl_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert mean_token_kl(teacher, student) == pytest.approx((kl_first + 0.0) / 2, abs=1e-6)
    assert mean_token_kl(student, student) == pytest.approx(0.0, abs=1e-7)


def test_alignment_scores_and_report(tmp_path):
    s = alignment_scores(["a b c d", "same text here"], ["a b c d", "same text here"], kls=[0.5, 1.5])
    assert s["alignment_bleu"] == pytest.approx(100.0) and s["alignment_chrf"] == pytest.approx(100.0)
    assert s["alignment_kl"] == pytest.approx(1.0)

    preds = tmp_path / "out.jsonl"
    write_jsonl(preds, [
        {"audio": "a.wav", "reference": "the cat sat", "response": "the cat sit"},
        {"audio": "b.wav", "reference": "hello world", "response": "hello world"},
        {"audio": "c.wav", "reference": "skipped", "error": "missing_file: c.wav"},
    ])
    cfg = config_from_dict({"model": {"lm_path": "x", "whisper_path": "y"}, "evaluate": {"metrics": ["wer", "cer", "alignment"]}})
    report = run_evaluate(cfg, str(preds), str(tmp_path / "eval"))
    assert report["scored"] == 2 and report["skipped"] == 1
    assert report["metrics"] == {"wer": pytest.approx(0.2), "cer": pytest.approx(1 / 22)}  # 1 char of 11 + 11
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["metrics"]["wer"] == pytest.approx(0.2)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| wer | 0.2000 |" in md


def test_behaviour_alignment_runs_on_a_checkpoint(tiny_assets, speech_corpus, tmp_path):
    from blsp_ray.stages.evaluate import behaviour_alignment
    from blsp_ray.model.modeling import build_blsp_from_parts
    from blsp_ray.io.storage import read_jsonl

    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
    model.save_adapter(tmp_path / "ckpt", str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    cfg = config_from_dict({"model": {"lm_path": "x", "whisper_path": "y"},
                            "generate": {"engine": "transformers", "max_new_tokens": 8}})
    rows = read_jsonl(speech_corpus["heldout"])[:2]
    s = behaviour_alignment(cfg, str(tmp_path / "ckpt"), rows)
    assert s["alignment_rows"] == 2
    assert 0.0 <= s["alignment_chrf"] <= 100.0
    assert s["alignment_kl"] > 0.0 and math.isfinite(s["alignment_kl"])  # untrained adapter: speech != text
