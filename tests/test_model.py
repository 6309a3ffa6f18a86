from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, WhisperConfig

from blsp_ray.config import load_config
from blsp_ray.io.storage import read_jsonl
from blsp_ray.model.audio import load_audio
from blsp_ray.model.modeling import (
    BlspModel,
    SpeechBatch,
    blsp_config_for,
    build_blsp_from_parts,
    load_blsp,
    to_device,
)
from blsp_ray.model.processing import IGNORE, BlspProcessor
from original_release import OriginalForward, write_original_checkpoint

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Continue the following text in a coherent and engaging style with less than 40 words."


@pytest.fixture(scope="module")
def parts(tiny_assets):
    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32).eval()
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    return model, proc


@pytest.fixture(scope="module")
def clips(speech_corpus):
    rows = read_jsonl(speech_corpus["train"])[:3]
    return rows, [load_audio(r["audio"]) for r in rows]


def test_forward_backward_loss_only_on_target(parts, clips):
    model, proc = parts
    rows, wavs = clips
    examples = [proc.speech_prompt(INSTRUCTION, r["text"]) for r in rows]
    batch = proc.collate_speech(examples, wavs)
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    # Recompute the loss by hand over target positions only.
    embeds, attn, labels = model.splice(
        batch["prefix_ids"], batch["prefix_mask"], *model.speech_embeddings(batch["speech"]),
        batch["suffix_ids"], batch["suffix_mask"], batch["suffix_labels"],
    )
    target_ids = [proc.tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [proc.tokenizer.eos_token_id] for r in rows]
    for i, t in enumerate(target_ids):
        assert labels[i][labels[i] != IGNORE].tolist() == t  # labels are exactly the target + EOS
    logits = out.logits[:, :-1]
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(out.loss, manual)
    assert model.adapter.fc1.weight.grad.abs().sum() > 0
    assert model.subsampler.conv_layers[0].weight.grad.abs().sum() > 0


def test_freeze_backbones_leaves_only_adapter_trainable(tiny_assets):
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=16)
    model.freeze_backbones()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"subsampler", "adapter", "speech_ln"}


@pytest.mark.parametrize("frames", [1, 7, 16, 100, 333, 3000])
def test_adapter_output_length_is_frames_over_subsampling(parts, frames):
    model, proc = parts
    torch.manual_seed(frames)
    feats = torch.randn(1, 80, frames)
    emb, lengths = model.speech_embeddings(SpeechBatch(feats, torch.tensor([frames])))
    assert model.speech_adapter.subsampling_factor == 16
    expected = -(-frames // 16)  # ceil: each stride-2 layer keeps floor((L-1)/2)+1
    assert emb.shape == (1, expected, model.llama_model.config.hidden_size)
    assert lengths.tolist() == [expected]


def test_batched_speech_equals_one_by_one(parts, clips):
    model, proc = parts
    _, wavs = clips
    with torch.no_grad():
        emb, lengths = model.speech_embeddings(proc.features(wavs))
        for i, w in enumerate(wavs):
            single, n = model.speech_embeddings(proc.features([w]))
            assert int(lengths[i]) == int(n[0])
            torch.testing.assert_close(emb[i, : int(n[0])], single[0], atol=1e-5, rtol=1e-4)


def test_no_speech_gives_plain_lm_logits(parts):
    model, proc = parts
    ex = proc.speech_prompt("Say something.", "Hello there.")
    batch = proc.collate_speech([ex])
    with torch.no_grad():
        ours = model(**batch).logits
        ids = torch.tensor([ex["prefix_ids"] + ex["suffix_ids"]])
        plain = model.llama_model(input_ids=ids).logits
    torch.testing.assert_close(ours, plain)


def _logits(model, proc, wav, text="The baker sold bread."):
    batch = proc.collate_speech([proc.speech_prompt(INSTRUCTION, text)], [wav])
    with torch.no_grad():
        return model(**batch).logits


def test_save_load_round_trip_full_and_adapter_only(parts, clips, tmp_path, tiny_assets):
    model, proc = parts
    wav = clips[1][0]
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(0.01)  # not the initial state
    before = _logits(model, proc, wav)
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").exists()
    model.save_adapter(tmp_path / "adapter", tiny_assets / "lm", tiny_assets / "whisper")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.safetensors", "blsp_adapter.json"}
    for path in ("full", "adapter"):
        loaded = load_blsp(tmp_path / path).eval()
        torch.testing.assert_close(_logits(loaded, proc, wav), before, rtol=0, atol=0)


def test_original_checkpoint_layout_loads_with_parity(tiny_assets, clips, tmp_path):
    # A checkpoint as the original release writes it (its key names, its config fields, a .bin file)
    # and its forward, both from tests/original_release.py.
    ckpt = tmp_path / "blsp_original"
    state = write_original_checkpoint(tiny_assets / "lm", tiny_assets / "whisper", ckpt)
    model = load_blsp(ckpt, pad_audio_to_30s=True).eval()
    for k, v in state.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)

    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper", pad_audio_to_30s=True)
    wav = clips[1][0]
    ex = proc.speech_prompt(INSTRUCTION)
    batch = proc.collate_speech([ex], [wav])
    assert batch["speech"].features.shape[-1] == 3000
    original = OriginalForward(state, WhisperConfig.from_pretrained(tiny_assets / "whisper"),
                               LlamaForCausalLM.from_pretrained(tiny_assets / "lm"))
    with torch.no_grad():
        ours = model(**batch).logits
    ref = original.logits(ex["prefix_ids"], original.speech(batch["speech"].features, int(batch["speech"].frame_lengths[0])),
                          ex["suffix_ids"])
    torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=1e-4)

    # Without the padding switch the same weights see only the real frames: close, not equal.
    real = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    model.config.pad_audio_to_30s = False
    with torch.no_grad():
        unpadded = model(**real.collate_speech([ex], [wav])).logits
    assert unpadded.shape == ours.shape
    assert not torch.allclose(unpadded, ours, atol=1e-4)


def test_paper_config_on_meta_device():
    cfg = load_config(REPO / "configs" / "blsp-7b.yaml")
    with torch.device("meta"):
        model = BlspModel(blsp_config_for(cfg.model))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    lm, enc = count(model.llama_model), count(model.whisper_model)
    adapter = count(model.subsampler) + count(model.adapter) + count(model.speech_ln)
    print(f"blsp-7b: LM {lm / 1e9:.3f} B, Whisper encoder {enc / 1e6:.1f} M, adapter {adapter / 1e6:.1f} M")
    assert 6.6e9 < lm < 6.8e9  # Llama-2-7B: 6.74 B
    assert 85e6 < enc < 92e6  # whisper-small encoder: about 88 M
    assert 40e6 < adapter < 50e6  # 3 convs (768 -> 1536, 768 -> 1536, 768 -> 8192, k=5) + 2 x 4096 x 512
    assert all(p.device.type == "meta" for p in model.parameters())


def test_collated_batch_moves_to_the_training_device(parts, clips):
    # The training loop collates on the CPU and moves each batch to the DeepSpeed engine's device
    # (cuda:N on a GPU worker); "meta" stands in for it here. The speech features travel too.
    _, proc = parts
    rows, waves = clips
    batch = proc.collate_speech([proc.speech_prompt(INSTRUCTION, r["text"]) for r in rows], waves)
    batch["note"] = "kept"
    moved = to_device(batch, "meta")
    assert moved["note"] == "kept"
    assert moved["speech"].features.is_meta and moved["speech"].frame_lengths.is_meta
    tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(moved[k].is_meta and moved[k].shape == batch[k].shape for k in tensors)


def test_feature_extractor_frames_match_samples(tiny_assets):
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    wavs = [np.zeros(16000, np.float32) + 0.01, np.zeros(8000, np.float32) + 0.01]
    sb = proc.features(wavs)
    assert sb.features.shape[-1] == 100
    assert sb.frame_lengths.tolist() == [100, 50]


def test_ctc_token_positions_keep_one_embedding_per_emitted_token(tiny_assets, tmp_path):
    """speech_positions: ctc_tokens. Positions scoring a token above the blank (logit 0) are kept
    once per run of the same token; blanks and repeats go; a row with none keeps one position;
    the setting travels with the checkpoint."""
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32, speech_positions="ctc_tokens")
    table = model.llama_model.get_input_embeddings().weight.detach()  # [V, H]
    a, b, c = table[5] * 50, table[9] * 50, table[7] * 50
    blank = torch.zeros_like(a)  # scores 0 for every token: not above the blank
    row0 = torch.stack([a, a, blank, b, c, c, a])  # a a _ b c c a | (7 real positions)
    row1 = torch.stack([blank, blank, blank, blank, blank, blank, blank])
    embeds, lengths = model.select_speech_positions(torch.stack([row0, row1]), torch.tensor([6, 4]))  # row 0's last is padding
    assert lengths.tolist() == [3, 1]
    torch.testing.assert_close(embeds[0, :3], torch.stack([a, b, c]))
    assert (embeds[0, 3:] == 0).all()
    model.save_adapter(tmp_path / "ckpt", str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    assert load_blsp(tmp_path / "ckpt").config.speech_positions == "ctc_tokens"
    plain = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
    same, n = plain.select_speech_positions(torch.stack([row0, row1]), torch.tensor([6, 4]))
    assert n.tolist() == [6, 4] and same.shape == (2, 7, table.shape[1])  # "all": the adapter's output as it is


def test_distance_token_score_reads_a_position_as_a_token_only_near_its_embedding(tiny_assets, tmp_path):
    """token_score: distance. A vector on a token's embedding reads as that token; one pointing the
    token's way at 50x its length reads as that token by the dot score but as a blank by distance,
    so the positions the LM reads are ones it could read as text; the setting travels with the checkpoint."""
    parts = dict(adapter_inner_dim=32, speech_positions="ctc_tokens")
    near = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", token_score="distance", **parts)
    dot = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", **parts)
    table = near.llama_model.get_input_embeddings().weight.detach()  # [V, H]
    a, b, long = table[5], table[9] * 1.05, table[7] * 50
    row = torch.stack([a, a, long, b])[None]  # [1, 4, H]
    embeds, lengths = near.select_speech_positions(row, torch.tensor([4]))
    assert lengths.tolist() == [2]
    torch.testing.assert_close(embeds[0], torch.stack([a, b]))
    assert dot.select_speech_positions(row, torch.tensor([4]))[1].tolist() == [3]
    near.save_adapter(tmp_path / "ckpt", str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    assert load_blsp(tmp_path / "ckpt").config.token_score == "distance"
    with pytest.raises(ValueError, match="token_score"):
        build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", token_score="cosine", **parts)
