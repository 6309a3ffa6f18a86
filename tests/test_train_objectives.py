"""Stage-2 objectives (issue 10): CE on the continuation, response KL against the transcript-reading teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from blsp_ray.config import Stage2Config, load_config
from blsp_ray.io.storage import read_jsonl
from blsp_ray.model.audio import load_audio
from blsp_ray.model.losses import continuation_forward, ctc_alignment, response_kl, stage2_objective
from blsp_ray.model.modeling import bf16_is_native, build_blsp_from_parts, frozen_dtype
from blsp_ray.model.processing import IGNORE, BlspProcessor
from blsp_ray.stages.stage2 import Stage2Task, prepare_stage2, truncate_target
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


def test_continuation_forward_reuses_each_prefix_and_gives_the_whole_sequences_logits(setup, tiny_assets, speech_corpus):
    """Rows of two tasks (two instructions, so two prefixes of different lengths) in one batch: the
    pass that computes each distinct prefix once gives the logits, targets and adapter gradients of
    the LM run over each whole [prefix | speech | suffix] sequence."""
    model, _ = setup
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    rows = read_jsonl(speech_corpus["train"])[:4]
    instructions = [INSTRUCTION, "Repeat:", INSTRUCTION, "Repeat:"]
    targets = ["and then it rained.", rows[1]["text"], "so we went home early.", rows[3]["text"]]
    batch = proc.collate_speech([proc.speech_prompt(i, t) for i, t in zip(instructions, targets)],
                                [load_audio(r["audio"]) for r in rows])
    assert len({int(m.sum()) for m in batch["prefix_mask"]}) == 2
    prompt = {k: batch[k] for k in ("prefix_ids", "prefix_mask", "suffix_ids", "suffix_mask", "suffix_labels")}

    def adapter_grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in model.speech_adapter.parameters()]

    embeds, lengths = model.speech_embeddings(batch["speech"])
    logits, tokens = continuation_forward(model, prompt, embeds, lengths)
    grads = adapter_grads(torch.nn.functional.cross_entropy(logits, tokens))
    embeds, lengths = model.speech_embeddings(batch["speech"])
    inputs, attention, labels = model.splice(prompt["prefix_ids"], prompt["prefix_mask"], embeds, lengths,
                                             prompt["suffix_ids"], prompt["suffix_mask"], prompt["suffix_labels"])
    whole = model.llama_model(inputs_embeds=inputs, attention_mask=attention).logits  # [B, L, V]
    keep = labels[:, 1:] != IGNORE
    expected_logits, expected_tokens = whole[:, :-1][keep], labels[:, 1:][keep]
    expected_grads = adapter_grads(torch.nn.functional.cross_entropy(expected_logits, expected_tokens))
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_a_bfloat16_frozen_lm_gives_the_float32_loss_and_adapter_gradients_within_tolerance(tiny_assets, setup):
    """stage2.frozen_lm_dtype: the LM held in bfloat16, the adapter in float32. On the same batch the CE
    and the adapter's gradients are those of the float32 LM to bfloat16's precision (8 mantissa bits)."""
    _, batch = setup

    def loss_and_grads(lm_dtype):
        torch.manual_seed(0)
        model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
        model.freeze_backbones()
        model.llama_model.to(lm_dtype)
        embeds, lengths = model.speech_embeddings(batch["speech"])
        loss = stage2_objective(model, batch, embeds, lengths)["loss"]
        loss.backward()
        assert all(p.dtype == torch.float32 for p in model.speech_adapter.parameters())
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.speech_adapter.parameters()])

    loss32, grad32 = loss_and_grads(torch.float32)
    loss16, grad16 = loss_and_grads(torch.bfloat16)
    assert abs(loss16 - loss32) / loss32 < 5e-3, (loss16, loss32)
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99
    assert float(grad16.norm() / grad32.norm()) == pytest.approx(1.0, abs=0.05)


def test_frozen_dtype_follows_the_setting_and_the_hardware():
    assert frozen_dtype(None, torch.float32) == torch.float32
    assert frozen_dtype(None, torch.bfloat16) == torch.bfloat16  # precision: bf16
    assert frozen_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert frozen_dtype("float32", torch.bfloat16) == torch.float32
    assert frozen_dtype("auto", torch.float32, "cpu") == (torch.bfloat16 if bf16_is_native("cpu") else torch.float32)
    assert Stage2Config(frozen_lm_dtype="auto").frozen_lm_dtype == "auto"
    with pytest.raises(ValidationError):
        Stage2Config(frozen_lm_dtype="float16")


def test_response_kl_matches_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(response_kl(student, teacher, t), expected)


def test_ctc_alignment_learns_where_tokens_are_spoken(setup, tiny_assets):
    """Tokens spoken at an uneven pace (1 then 3 positions, alternately): CTC scores the matching
    speech near zero wherever the tokens fall, and another clip's speech far from it."""
    model, batch = setup
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    ids, n = batch["transcript_ids"], batch["transcript_lengths"]
    table = model.llama_model.get_input_embeddings()
    rows = [torch.repeat_interleave(ids[b, : n[b]], torch.tensor([1 + 2 * (t % 2) for t in range(int(n[b]))])) for b in range(len(n))]
    lengths = torch.tensor([len(r) for r in rows])
    spoken = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=proc.pad_id)  # [B, S]
    # A confident match at every position: far along each token's direction (dot), on it (distance).
    try:
        for score, frames in (("dot", table(spoken) * 500), ("distance", table(spoken))):
            model.config.token_score = score
            with torch.no_grad():
                for negatives in (None, 64):
                    aligned = float(ctc_alignment(model, frames, lengths, ids, n, negatives))
                    shuffled = float(ctc_alignment(model, frames.roll(1, dims=0), lengths.roll(1), ids, n, negatives))
                    assert aligned < 0.05 < shuffled, (score, negatives, aligned, shuffled)
    finally:
        model.config.token_score = "dot"  # the module's model, as the other tests build it
    embeds, speech_lengths = model.speech_embeddings(batch["speech"])
    model.zero_grad(set_to_none=True)
    ctc_alignment(model, embeds, speech_lengths, ids, n, 64).backward()
    assert all(p.grad is None for p in model.llama_model.parameters())  # only the adapter learns
    assert model.adapter.fc1.weight.grad.abs().sum() > 0


def test_learning_rate_restarts_its_warm_up_and_decay_at_each_phase():
    one = WarmupDecay([0], total_steps=10, warmup=2)
    assert [round(one(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    two = WarmupDecay([0, 4], total_steps=10, warmup=2)  # alignment warm-up of 4 steps, then 6
    assert [round(two(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    scaled = WarmupDecay([0, 4], total_steps=10, warmup=2, phase_scales=[1.0, 0.25])  # objective_lr = lr / 4
    assert [round(scaled(s), 4) for s in range(10)] == [0.5, 1.0, 1.0, 0.5, 0.125, 0.25, 0.25, 0.1875, 0.125, 0.0625]
    with pytest.raises(ValueError, match="2 phase scales for 1 phases"):
        WarmupDecay([0], total_steps=10, warmup=2, phase_scales=[1.0, 0.5])


def test_objective_lr_sets_the_second_phase_and_needs_a_warm_up():
    cfg = load_config("configs/mini.yaml")
    task = Stage2Task(cfg)
    assert [p.start for p in task.phases] == [0, cfg.stage2.alignment_steps]
    assert [p.lr_scale for p in task.phases] == [1.0, pytest.approx(cfg.stage2.objective_lr / cfg.stage2.lr)]
    with pytest.raises(ValidationError, match="with alignment_steps 0 there is one phase"):
        Stage2Config(lr=3e-3, objective_lr=1e-3, alignment_steps=0)


def test_continuation_tokens_keeps_the_template_and_the_first_target_tokens(tiny_assets):
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    ex = proc.speech_prompt("Continue.", "one two three four five six seven eight")
    template = sum(1 for l in ex["suffix_labels"] if l == IGNORE)
    ids, labels = truncate_target(ex["suffix_ids"], ex["suffix_labels"], 3)
    assert list(ids) == ex["suffix_ids"][: template + 3]
    assert (labels[:template] == IGNORE).all() and list(labels[template:]) == ex["suffix_labels"][template : template + 3]
    batch = {"waveform": [np.zeros(16000, np.float32)] * 2, "prefix_ids": [ex["prefix_ids"]] * 2, "task": ["continuation", "transcription"],
             "suffix_ids": [ex["suffix_ids"]] * 2, "suffix_labels": [ex["suffix_labels"]] * 2}
    full = prepare_stage2(batch, str(tiny_assets / "lm"), False, 8)
    cut = prepare_stage2(batch, str(tiny_assets / "lm"), False, 8, continuation_tokens=3)
    assert full["length"][0] - cut["length"][0] == len(ex["suffix_ids"]) - template - 3  # bucketing sees the cut
    assert list(cut["suffix_ids"][1]) == list(ex["suffix_ids"]) and cut["length"][1] == full["length"][1]  # a transcript stays whole
