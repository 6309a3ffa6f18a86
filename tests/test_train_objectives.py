"""Stage-2 objectives (issue 10): CE on the continuation, response KL against the transcript-reading teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blsp_ray.io.storage import read_jsonl
from blsp_ray.model.audio import load_audio
from blsp_ray.model.losses import response_kl, spread_transcript, stage2_objective, token_alignment
from blsp_ray.model.modeling import build_blsp_from_parts
from blsp_ray.model.processing import IGNORE, BlspProcessor, token_char_counts
from blsp_ray.stages.stage2 import prepare_stage2, truncate_target
from blsp_ray.train.deepspeed_config import WarmupDecay

INSTRUCTION = "Continue the following text in a coherent and engaging style with less than 40 words."


@pytest.fixture(scope="module")
def setup(tiny_assets, speech_corpus):
    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
    model.freeze_backbones()
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    rows = read_jsonl(speech_corpus["train"])[:3]
    targets = ["and then it rained all day.", "so we went home early.", "which surprised everyone."]
    batch = proc.collate_speech([proc.speech_prompt(INSTRUCTION, t) for t in targets], [load_audio(r["audio"]) for r in rows])
    ids = [proc.tokenizer(" " + r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    batch["transcript_ids"] = torch.full((len(ids), max(map(len, ids))), proc.pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        batch["transcript_ids"][i, : len(row)] = torch.tensor(row)
    batch["transcript_lengths"] = torch.tensor([len(r) for r in ids])
    return model, batch


def test_kl_is_zero_when_speech_equals_the_transcript_embeddings(setup):
    model, batch = setup
    stand_in = model.llama_model.get_input_embeddings()(batch["transcript_ids"])  # [B, T, H]
    with torch.no_grad():
        parts = stage2_objective(model, batch, stand_in, batch["transcript_lengths"], objective="kl", temperature=2.0)
    assert abs(float(parts["kl"])) < 1e-6
    assert float(parts["ce"]) > 1.0  # the CE itself is not zero: the continuation is unlikely for a random LM


def test_kl_on_real_speech_is_positive_and_trains_only_the_adapter(setup):
    model, batch = setup
    model.zero_grad(set_to_none=True)
    embeds, lengths = model.speech_embeddings(batch["speech"])
    parts = stage2_objective(model, batch, embeds, lengths, objective="kl", temperature=2.0)
    assert float(parts["kl"].detach()) > 1e-3
    parts["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith(("subsampler.", "adapter.", "speech_ln.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_ce_plus_kl_is_the_weighted_sum(setup):
    model, batch = setup
    with torch.no_grad():
        embeds, lengths = model.speech_embeddings(batch["speech"])
        both = stage2_objective(model, batch, embeds, lengths, objective="ce+kl", ce_weight=0.3, kl_weight=0.7)
        ce = stage2_objective(model, batch, embeds, lengths, objective="ce")["loss"]
        kl = stage2_objective(model, batch, embeds, lengths, objective="kl")["loss"]
    torch.testing.assert_close(both["loss"], 0.3 * ce + 0.7 * kl)
    torch.testing.assert_close(both["ce"], ce)
    with torch.no_grad():  # the continuation-only CE is BlspModel.forward's loss
        full = model(**{k: batch[k] for k in ("prefix_ids", "prefix_mask", "suffix_ids", "suffix_mask", "suffix_labels")},
                     speech_embeds=embeds, speech_lengths=lengths).loss
    torch.testing.assert_close(ce, full)


def test_response_kl_matches_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(response_kl(student, teacher, t), expected)


def test_spread_transcript_gives_each_token_a_share_of_the_clip_by_its_characters():
    chars = torch.tensor([[1, 3, 1, 0], [2, 2, 0, 0]])  # [B, T], 0 past the transcript
    index = spread_transcript(chars, torch.tensor([10, 4]), 10)
    assert index[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    assert index[1, :4].tolist() == [0, 0, 1, 1] and int(index[1].max()) == 1  # never past the last token


def test_token_alignment_is_lowest_when_speech_positions_are_the_spoken_tokens(setup, tiny_assets):
    model, batch = setup
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    ids, n = batch["transcript_ids"], batch["transcript_lengths"]
    chars = token_char_counts(proc.tokenizer)[ids] * (torch.arange(ids.shape[1])[None] < n[:, None])
    lengths = 2 * n  # two speech positions per token on average
    spoken = ids.gather(1, spread_transcript(chars, lengths, int(lengths.max())))  # [B, S]
    frames = model.llama_model.get_input_embeddings()(spoken) * 500  # a confident match
    shuffled_frames, shuffled_lengths = frames.roll(1, dims=0), lengths.roll(1)  # another row's speech
    with torch.no_grad():
        shuffled = {}
        for negatives in (None, 64):
            aligned = token_alignment(model, frames, lengths, ids, chars, negatives)
            shuffled[negatives] = float(token_alignment(model, shuffled_frames, shuffled_lengths, ids, chars, negatives))
            assert float(aligned) < 0.05 < shuffled[negatives], negatives
    # Sampled: never above the whole vocabulary's loss (a subset of the same competitors).
    assert shuffled[64] <= shuffled[None] + 1e-4
    embeds, speech_lengths = model.speech_embeddings(batch["speech"])
    model.zero_grad(set_to_none=True)
    token_alignment(model, embeds, speech_lengths, ids, chars).backward()
    assert all(p.grad is None for p in model.llama_model.parameters())  # only the adapter learns
    assert model.adapter.fc1.weight.grad.abs().sum() > 0


def test_learning_rate_restarts_its_warm_up_and_decay_at_each_phase():
    one = WarmupDecay([0], total_steps=10, warmup=2)
    assert [round(one(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    two = WarmupDecay([0, 4], total_steps=10, warmup=2)  # alignment warm-up of 4 steps, then 6
    assert [round(two(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_continuation_tokens_keeps_the_template_and_the_first_target_tokens(tiny_assets):
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    ex = proc.speech_prompt("Continue.", "one two three four five six seven eight")
    template = sum(1 for l in ex["suffix_labels"] if l == IGNORE)
    ids, labels = truncate_target(ex["suffix_ids"], ex["suffix_labels"], 3)
    assert list(ids) == ex["suffix_ids"][: template + 3]
    assert (labels[:template] == IGNORE).all() and list(labels[template:]) == ex["suffix_labels"][template : template + 3]
    batch = {"waveform": [np.zeros(16000, np.float32)], "prefix_ids": [ex["prefix_ids"]],
             "suffix_ids": [ex["suffix_ids"]], "suffix_labels": [ex["suffix_labels"]]}
    full = prepare_stage2(batch, str(tiny_assets / "lm"), False, 8)
    cut = prepare_stage2(batch, str(tiny_assets / "lm"), False, 8, continuation_tokens=3)
    assert full["length"][0] - cut["length"][0] == len(ex["suffix_ids"]) - template - 3  # bucketing sees the cut
