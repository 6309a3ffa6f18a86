"""Parity with the original release's code for its checkpoints: frame count, the 30 s padding
switch, prompt ids, and greedy outputs through the user-facing paths (batch generation, the
Serve engine). The reference is ``tests/original_release.py``, written from the facts of the
original's code, never from ours."""

import asyncio
import base64
import io
import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor

from blsp_ray.config import CONTINUATION_INSTRUCTION, ServeConfig, config_from_dict
from blsp_ray.io.storage import read_jsonl, write_jsonl
from blsp_ray.model.audio import MIN_SAMPLES, AudioError, load_audio
from blsp_ray.model.modeling import checkpoint_pads_audio, load_blsp
from blsp_ray.model.processing import HOP_LENGTH, BlspProcessor, log_mel
from blsp_ray.stages.generate import run_generate
from original_release import OriginalForward, original_features, original_prompt_ids, write_original_checkpoint
from serve.app import BlspEngine
from serve.schemas import ApiError, to_chat_request

TRANSCRIBE = "Please transcribe the following audio."
# Clip lengths in samples, none a multiple of 160 (the hop): each has a partial last frame.
LENGTHS = [8_001, 12_345, 16_161, 20_037, 24_159, 28_001, 31_999]


def test_frame_count_is_the_feature_extractors_mask_sum(tiny_assets):
    """30 s mode: frames = the extractor's sample mask kept every 160th entry (ceil(n / 160)), and
    the features are the extractor's own; real-length mode counts the same frames."""
    extractor = WhisperFeatureExtractor.from_pretrained(tiny_assets / "whisper")
    rng = np.random.default_rng(0)
    # A sample of lengths over 1..30 s at 1-sample resolution, plus every boundary case.
    lengths = sorted(set(rng.integers(16_000, 480_001, 40).tolist())
                     | {MIN_SAMPLES, 1_599, 1_600, 1_601, 16_000, 16_001, 16_159, 479_840, 479_999, 480_000})
    for start in range(0, len(lengths), 10):
        wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in lengths[start : start + 10]]
        ref = extractor(wavs, sampling_rate=16_000, return_attention_mask=True, return_tensors="pt")
        ours = log_mel(extractor, wavs, pad_audio_to_30s=True)
        assert ours.frame_lengths.tolist() == ref["attention_mask"].sum(-1).tolist()
        assert ours.frame_lengths.tolist() == [math.ceil(len(w) / HOP_LENGTH) for w in wavs]
        torch.testing.assert_close(ours.features, ref["input_features"], rtol=0, atol=0)
        real = log_mel(extractor, wavs, pad_audio_to_30s=False)
        assert real.frame_lengths.tolist() == ours.frame_lengths.tolist()
        assert real.features.shape[-1] == max(ours.frame_lengths.tolist())
    with pytest.raises(AudioError, match="too_short"):
        log_mel(extractor, [np.zeros(MIN_SAMPLES - 1, np.float32)])


def _sentencepiece_llama(tmp_path, texts):
    """A small SentencePiece BPE model trained here with Llama-2's settings (byte fallback, digits
    split, dummy prefix, whitespace kept, identity normalisation), as a transformers directory."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))


@pytest.mark.parametrize("legacy", [True, False])
def test_prompt_ids_match_the_original_sentencepiece_tokenizer(tiny_assets, tmp_path, legacy):
    """The original tokenised with transformers 4.31's slow LlamaTokenizer: SentencePiece itself
    (``[BOS] + sp.encode(text)``). transformers 5 has one LlamaTokenizer (LlamaTokenizerFast is
    the same class), converted from the SentencePiece model; our prompt ids through it must be the
    original's for the original's instructions and for awkward text."""
    rng = np.random.default_rng(0)
    words = ("the a cat sat on mat please transcribe following audio continue text coherent engaging style with less than "
             "forty words speech café naïve 東京 hello world 40 ### [ ] : ? ! , .").split()
    corpus = [" ".join(rng.choice(words, 12)) for _ in range(3000)]
    corpus += ["###[Human]:" + c + "\n\n\n###[Assistant]:" for c in corpus[:500]]
    sp = _sentencepiece_llama(tmp_path, corpus)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    # Llama-2's tokenizer_config.json fields that matter here.
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": legacy}))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    processor = BlspProcessor(tokenizer, WhisperFeatureExtractor.from_pretrained(tiny_assets / "whisper"))
    instructions = [TRANSCRIBE, CONTINUATION_INSTRUCTION, "  leading spaces", "\nnewline first\n\nand inside",
                    "non-ASCII: café naïve 東京 😀", "tabs\tand\r\nCRLF", "digits 12345 3.14", ""] + corpus[:50]
    for instruction in instructions:
        ours = processor.speech_prompt(instruction)
        assert ours["prefix_ids"] == [1] + sp.encode("###[Human]:" + instruction), repr(instruction)
        assert ours["suffix_ids"] == sp.encode("\n\n\n###[Assistant]:")
        assert (ours["prefix_ids"], ours["suffix_ids"]) == original_prompt_ids(tokenizer, instruction)


@pytest.fixture(scope="module")
def release(tiny_assets, speech_corpus, tmp_path_factory):
    """An original-layout checkpoint, clips of LENGTHS (float wavs, so every path reads the same
    samples) and the reference greedy outputs for them."""
    root = tmp_path_factory.mktemp("release")
    ckpt = root / "blsp_original"
    state = write_original_checkpoint(tiny_assets / "lm", tiny_assets / "whisper", ckpt)
    source = np.concatenate([load_audio(r["audio"]) for r in read_jsonl(speech_corpus["heldout"])[:4]])
    assert len(source) >= max(LENGTHS)
    rows = []
    for n in LENGTHS:
        path = root / f"clip_{n}.wav"
        sf.write(path, source[:n], 16_000, subtype="FLOAT")
        rows.append({"audio": str(path), "samples": n})
    lm = LlamaForCausalLM.from_pretrained(tiny_assets / "lm")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    forward = OriginalForward(state, WhisperConfig.from_pretrained(tiny_assets / "whisper"), lm)
    extractor = WhisperFeatureExtractor.from_pretrained(ckpt)
    prefix, suffix = original_prompt_ids(tokenizer, TRANSCRIBE)
    for r in rows:
        wav = load_audio(r["audio"])
        feats, frames = original_features(extractor, wav)
        r["tokens"] = forward.greedy(prefix, forward.speech(feats, frames), suffix, 8, tokenizer.eos_token_id)
        r["text"] = tokenizer.decode(r["tokens"], skip_special_tokens=True).strip()
    return {"ckpt": ckpt, "rows": rows, "forward": forward, "extractor": extractor, "prefix": prefix, "suffix": suffix}


def test_release_checkpoint_loads_with_the_originals_logits(release):
    """Default load = the original's behaviour. Also prints what the two old behaviours gave (the
    n // 160 frame count; padding off, as a config without the key loaded before)."""
    ckpt, fwd = release["ckpt"], release["forward"]
    assert checkpoint_pads_audio(ckpt) is True and checkpoint_pads_audio(ckpt, False) is False
    model = load_blsp(ckpt).eval()
    assert model.config.pad_audio_to_30s
    proc = BlspProcessor.from_paths(ckpt, ckpt, model.config.pad_audio_to_30s)
    real_model, real_proc = load_blsp(ckpt, pad_audio_to_30s=False).eval(), BlspProcessor.from_paths(ckpt, ckpt)
    assert release["prefix"] == proc.speech_prompt(TRANSCRIBE)["prefix_ids"]
    q = len(release["suffix"])
    print("\nmax |logit difference| vs the original's forward (suffix positions), per clip length:")
    print(f"{'samples':>8} {'now (default load)':>19} {'old n//160 frames':>18} {'padding off':>12}")
    for r in release["rows"]:
        wav = load_audio(r["audio"])
        ex = proc.speech_prompt(TRANSCRIBE)
        feats, frames = original_features(release["extractor"], wav)
        ref = fwd.logits(release["prefix"], fwd.speech(feats, frames), release["suffix"])
        with torch.no_grad():
            ours = model(**proc.collate_speech([ex], [wav])).logits[0]
            unpadded = real_model(**real_proc.collate_speech([ex], [wav])).logits[0]
        old_count = fwd.logits(release["prefix"], fwd.speech(feats, len(wav) // HOP_LENGTH), release["suffix"])
        diffs = [float((x[-q:] - ref[-q:]).abs().max()) for x in (ours, old_count, unpadded)]
        print(f"{r['samples']:>8} {diffs[0]:>19.2e} {diffs[1]:>18.3f} {diffs[2]:>12.3f}")
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_release_checkpoint_through_generate_and_the_serve_engine(ray_cluster, release, tmp_path):
    """``jobs.generate``'s job and the Serve engine (its class, in this process) on the original-
    layout checkpoint answer each clip with the original's greedy output."""
    rows = release["rows"]
    write_jsonl(tmp_path / "in.jsonl", [{"audio": r["audio"], "id": r["samples"]} for r in rows])
    cfg = config_from_dict({"model": {"lm_path": "unused", "whisper_path": "unused"},
                            "cluster": {"storage_root": str(tmp_path / "runs")},
                            "generate": {"engine": "transformers", "batch_size": 4, "max_new_tokens": 8, "instruction": TRANSCRIBE}})
    run_generate(cfg, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), str(release["ckpt"]))
    out = read_jsonl(tmp_path / "out.jsonl")
    assert all(r["tokens"] for r in rows)  # the reference says something for every clip
    assert [o["id"] for o in out] == [r["samples"] for r in rows]
    assert [o.get("response") for o in out] == [r["text"] for r in rows]

    settings = ServeConfig(engine="transformers", max_new_tokens=8)
    engine = BlspEngine.func_or_class(str(release["ckpt"]), settings.model_dump())
    assert engine.speech_lm.model.config.pad_audio_to_30s

    async def reply(path) -> str:
        audio = base64.b64encode(open(path, "rb").read()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": TRANSCRIBE},
                                                          {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}],
                "max_tokens": 8, "temperature": 0}
        text = ""
        async for kind, value in engine.generate(to_chat_request(body, settings)):
            assert kind in ("delta", "done"), value
            text += value if kind == "delta" else ""
        return text.strip()

    assert [asyncio.run(reply(r["audio"])) for r in rows] == [r["text"] for r in rows]

    tiny = io.BytesIO()
    sf.write(tiny, np.zeros(MIN_SAMPLES - 1, np.float32), 16_000, format="WAV")
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(tiny.getvalue()).decode(), "format": "wav"}}]}]}
    with pytest.raises(ApiError) as err:
        to_chat_request(body, settings)
    assert err.value.status == 400 and err.value.code == "audio_too_short"
