import json

import soundfile as sf
from transformers import AutoTokenizer, LlamaConfig, WhisperConfig

from blsp_ray.demo.assets import build_tiny_assets
from blsp_ray.config import SpeechSynthConfig, TinyAssetsConfig
from blsp_ray.demo.speech import synthesize_corpus
from blsp_ray.io.storage import read_jsonl


def test_tiny_assets_are_hf_layout_and_idempotent(tiny_assets):
    lm = LlamaConfig.from_pretrained(tiny_assets / "lm")
    assert lm.hidden_size // lm.num_attention_heads == 64  # a head size vLLM's CPU attention supports
    assert WhisperConfig.from_pretrained(tiny_assets / "whisper").num_mel_bins == 80
    tok = AutoTokenizer.from_pretrained(tiny_assets / "lm")
    text = "The baker repaired the broken clock near the river."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    weights = tiny_assets / "lm" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    build_tiny_assets(TinyAssetsConfig(**json.loads((tiny_assets / "assets.json").read_text())))
    assert weights.stat().st_mtime_ns == before  # same settings: nothing rebuilt


def test_speech_corpus_manifest_rows_and_splits(speech_corpus):
    train, heldout = read_jsonl(speech_corpus["train"]), read_jsonl(speech_corpus["heldout"])
    assert len(train) + len(heldout) == 24 and len(heldout) == 5
    for row in train + heldout:
        info = sf.info(row["audio"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.duration - row["duration"]) < 1e-3 and 0.5 < row["duration"] < 15
        assert row["text"].endswith(".")
    # Held-out speech differs from training speech in sentences and in voices.
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert not {r["voice"] for r in train} & {r["voice"] for r in heldout}


def test_speech_rerun_reuses_wavs(tmp_path):
    cfg = SpeechSynthConfig(out_dir=str(tmp_path), num_sentences=3, heldout_fraction=0.0)
    first = read_jsonl(synthesize_corpus(cfg)["train"])
    mtimes = [(tmp_path / "wav" / p).stat().st_mtime_ns for p in sorted(x.name for x in (tmp_path / "wav").iterdir())]
    second = read_jsonl(synthesize_corpus(cfg)["train"])
    assert first == second
    assert mtimes == [(tmp_path / "wav" / p).stat().st_mtime_ns for p in sorted(x.name for x in (tmp_path / "wav").iterdir())]
