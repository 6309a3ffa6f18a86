"""Evaluation metrics against values computed by hand on small fixed examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from blsp_ray.config import config_from_dict
from blsp_ray.engines import TransformersEngine
from blsp_ray.heldout import HeldoutSet, bootstrap_difference, clip_word_errors, labelling_settings
from blsp_ray.io.storage import read_jsonl, write_jsonl
from blsp_ray.metrics import content_words, text_metrics
from blsp_ray.model.audio import load_audio
from blsp_ray.model.losses import response_kl
from blsp_ray.model.modeling import build_blsp_from_parts
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.speech_lm import SpeechLM
from blsp_ray.stages.evaluate import run_evaluate


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


def test_clip_word_errors_sum_to_the_corpus_wer():
    hyps, refs = ["the cat sit", "", "hello there world"], ["The cat sat.", "good morning", "hello world"]
    errors, words = clip_word_errors(hyps, refs)
    assert errors.tolist() == [1, 2, 1] and words.tolist() == [3, 2, 2]  # a substitution, 2 deletions, an insertion
    assert errors.sum() / words.sum() == pytest.approx(text_metrics(hyps, [r.lower().strip(".") for r in refs], ("wer",))["wer"])


def test_bootstrap_difference():
    rng = np.random.default_rng(1)
    words = rng.integers(5, 15, 150).astype(float)
    worse, better = rng.binomial(words.astype(int), 0.6), rng.binomial(words.astype(int), 0.2)
    diff, low, high = bootstrap_difference(better, words, worse, words)
    assert diff == pytest.approx(better.sum() / words.sum() - worse.sum() / words.sum())
    assert low < diff < high < 0  # clearly better: the interval excludes zero
    same = rng.binomial(words.astype(int), 0.4)
    diff, low, high = bootstrap_difference(same, words, same, words)
    assert diff == low == high == 0.0  # the same clips and numbers: no difference in any resample
    a, b = rng.binomial(words.astype(int), 0.4), rng.binomial(words.astype(int), 0.4)
    _, low, high = bootstrap_difference(a, words, b, words)
    assert low < 0 < high  # two draws of the same rate: zero inside


def test_content_words_leave_out_function_words():
    assert content_words("The cat came out from under the bed.") == {"cat", "came", "bed"}
    assert not content_words("It is what it is, and so on.") - {"so"} - {"on"}
    assert content_words("Had a minor part in the play") & content_words("The play was long") == {"play"}


def test_token_kl_by_hand():
    """The held-out KL (``response_kl`` at temperature 1): mean over positions of KL(teacher || student)."""
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2), (3/4, 1/4)
    student = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # q = (3/4, 1/4) twice
    kl_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(response_kl(student, teacher, temperature=1.0)) == pytest.approx((kl_first + 0.0) / 2, abs=1e-6)
    assert float(response_kl(student, student, temperature=1.0)) == pytest.approx(0.0, abs=1e-7)


def test_report(tmp_path):
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


def test_evaluate_alignment_is_the_heldout_kl(tiny_assets, speech_corpus, tmp_path):
    """Issue 19, bug 2: the evaluate stage's KL(text || speech) is ``HeldoutSet``'s, the one stage 2
    reports (teacher: the transcript's embeddings where the speech goes, ``stage2.instruction``),
    not a second definition with its own teacher prompt."""
    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32).eval()
    model.save_adapter(tmp_path / "ckpt", str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    rows = read_jsonl(speech_corpus["heldout"])[:2]
    write_jsonl(tmp_path / "preds.jsonl", [{**r, "response": r["text"]} for r in rows])
    cfg = config_from_dict({"model": {"lm_path": "x", "whisper_path": "y"}, "label": {"max_new_tokens": 8},
                            "generate": {"engine": "transformers", "max_new_tokens": 8},
                            "evaluate": {"metrics": ["wer", "alignment"]}})
    s = run_evaluate(cfg, str(tmp_path / "preds.jsonl"), str(tmp_path / "eval"), "text", blsp_model=str(tmp_path / "ckpt"))["metrics"]
    assert s["alignment_rows"] == 2
    assert 0.0 <= s["alignment_chrf"] <= 100.0
    assert s["alignment_kl"] > 0.0 and math.isfinite(s["alignment_kl"])  # untrained adapter: speech != text

    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    engine = TransformersEngine(model.llama_model, proc.tokenizer, labelling_settings(cfg), 16)
    held = HeldoutSet(SpeechLM(model, proc, engine, 16), rows, [load_audio(r["audio"]) for r in rows],
                      instruction=cfg.stage2.instruction)
    expected = held.teacher_forced(model.speech_adapter, "speech")
    assert s["alignment_kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-6)
    assert s["alignment_nll"] == pytest.approx(expected["nll"], rel=1e-4, abs=1e-6)
