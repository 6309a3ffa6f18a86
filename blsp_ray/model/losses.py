"""Stage-2 objectives: cross-entropy on the continuation (the paper's), the BLSP-KD response KL,
and the token-alignment warm-up.

KL(teacher || student): the frozen LM reads the transcript (teacher) and the speech (student),
each followed by the same continuation tokens; their next-token distributions are compared at
every continuation position, token by token, with a temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blsp_ray.model.modeling import length_mask, token_scores
from blsp_ray.model.processing import IGNORE


def response_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/T) || softmax(student/T)), scaled by T^2 (gradient scale of CE).

    student_logits, teacher_logits: [N, V] aligned rows.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits do not align")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [N]
    return kl.mean() * temperature**2


def continuation_forward(blsp, prompt: dict, speech_embeds: torch.Tensor, speech_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM over [prefix | speech | suffix]; logits [N, V] only where a continuation token is predicted, and those tokens [N].

    The prefix (template + instruction) is the same for every row of a task and holds no speech,
    so nothing trainable is upstream of it: the frozen LM's keys and values for it are computed
    once per distinct prefix, without a graph, and each row's pass starts at its last prefix token
    (whose output predicts the first position after it). Same logits as the whole sequence at once,
    for one prefix forward per batch instead of one per row. The vocabulary projection, the largest
    matmul of a small LM, runs only where a target token is predicted.
    """
    lm = blsp.llama_model
    prefix_ids, prefix_mask = prompt["prefix_ids"], prompt["prefix_mask"]
    groups: dict[tuple[int, ...], list[int]] = {}  # distinct prefix -> its rows
    for i in range(prefix_ids.shape[0]):
        groups.setdefault(tuple(prefix_ids[i][prefix_mask[i].bool()].tolist()), []).append(i)
    hidden_rows: list[torch.Tensor | None] = [None] * prefix_ids.shape[0]
    label_rows: list[torch.Tensor | None] = [None] * prefix_ids.shape[0]
    for prefix, rows in groups.items():
        idx = torch.tensor(rows, device=prefix_ids.device)
        n = len(rows)
        last = prefix_ids.new_tensor([prefix[-1:]] * n)  # [n, 1]: the pass starts here
        inputs_embeds, attention_mask, labels = blsp.splice(
            last, torch.ones_like(last), speech_embeds[idx], speech_lengths[idx],
            prompt["suffix_ids"][idx], prompt["suffix_mask"][idx], prompt["suffix_labels"][idx],
        )  # [n, L, H], [n, L], [n, L]
        cache = None
        if len(prefix) > 1:
            with torch.no_grad():
                cache = lm.model(input_ids=prefix_ids.new_tensor([prefix[:-1]]), use_cache=True).past_key_values
            cache.batch_repeat_interleave(n)
            attention_mask = torch.cat([attention_mask.new_ones(n, len(prefix) - 1), attention_mask], 1)
        hidden = lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=cache,
                          use_cache=cache is not None).last_hidden_state  # [n, L, H]
        for j, i in enumerate(rows):
            hidden_rows[i], label_rows[i] = hidden[j], labels[j]
    # Position t predicts label t+1; rows in order, so the logits come clip by clip.
    keep = [labels[1:] != IGNORE for labels in label_rows]
    logits = lm.lm_head(torch.cat([h[:-1][k] for h, k in zip(hidden_rows, keep)]))  # [N, V]
    return logits, torch.cat([labels[1:][k] for labels, k in zip(label_rows, keep)])


def ctc_alignment(blsp, speech_embeds: torch.Tensor, speech_lengths: torch.Tensor, transcript_ids: torch.Tensor,
                  transcript_lengths: torch.Tensor, negatives: int | None = None) -> torch.Tensor:
    """CTC of the transcript's tokens over the adapter's output positions: each position is scored
    against the LM's token embeddings (``token_scores``, by the model's ``token_score``) plus a
    blank whose logit is fixed at 0 (no new parameters: the adapter learns to say "nothing here" by
    scoring below 0 on every token). Every monotonic
    alignment is summed, so where each token is spoken is learnt, not assumed. A warm-up that
    gives the adapter's output the words' identity before the objective, without running the LM.
    ``negatives``: a sampled softmax over the batch's spoken tokens plus this many drawn uniformly
    from the vocabulary, instead of all of it (the [B, S, V] product is most of a step's cost).
    Mean over the batch of the loss per transcript token. speech_embeds [B, S, H];
    transcript_ids [B, T]; lengths [B].
    """
    table = blsp.llama_model.get_input_embeddings().weight  # [V, H]
    spoken = transcript_ids[length_mask(transcript_lengths, transcript_ids.shape[1])]  # [N]
    if negatives:
        drawn = torch.randint(0, table.shape[0], (negatives,), device=spoken.device)
        candidates = torch.unique(torch.cat([spoken, drawn]))  # [C], sorted
        targets = torch.searchsorted(candidates, transcript_ids).clamp(max=len(candidates) - 1)  # past the end: unread
    else:
        targets, candidates = transcript_ids, None
    scores = token_scores(speech_embeds.float(), table, blsp.config.token_score, candidates)  # [B, S, C]
    blank = scores.shape[-1]
    logits = torch.cat([scores, scores.new_zeros(*scores.shape[:2], 1)], dim=-1)  # [B, S, C + 1]
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # [S, B, C + 1], as ctc_loss reads it
    return F.ctc_loss(log_probs, targets, speech_lengths, transcript_lengths, blank=blank, zero_infinity=True)


def stage2_objective(
    blsp,
    batch: dict,
    speech_embeds: torch.Tensor,
    speech_lengths: torch.Tensor,
    objective: str = "ce",
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    temperature: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Loss of one stage-2 batch given adapter output ``speech_embeds`` [B, S, H] (lengths [B]).

    ``batch`` holds the collated prompt tensors (prefix/suffix ids, masks, labels) and, for
    ``kl``, ``transcript_ids`` [B, T] + ``transcript_lengths`` [B]: the transcript's tokens, which
    the teacher reads where the student reads speech. Returns ``loss`` and its parts. The CE is
    the same as ``BlspModel.forward``'s loss (mean over continuation tokens).
    """
    if objective not in ("ce", "kl", "ce+kl"):
        raise ValueError(f"unknown stage-2 objective {objective!r} (ce | kl | ce+kl)")
    prompt = {k: batch[k] for k in ("prefix_ids", "prefix_mask", "suffix_ids", "suffix_mask", "suffix_labels")}
    student_logits, targets = continuation_forward(blsp, prompt, speech_embeds, speech_lengths)
    parts: dict[str, torch.Tensor] = {"ce": F.cross_entropy(student_logits.float(), targets)}
    if objective in ("kl", "ce+kl"):
        with torch.no_grad():
            transcript_embeds = blsp.llama_model.get_input_embeddings()(batch["transcript_ids"])  # [B, T, H]
            # Same continuation after the transcript: the rows line up token by token with the student's.
            teacher_logits, _ = continuation_forward(blsp, prompt, transcript_embeds, batch["transcript_lengths"])
        parts["kl"] = response_kl(student_logits, teacher_logits, temperature)
    if objective == "ce":
        loss = parts["ce"]
    elif objective == "kl":
        loss = parts["kl"]
    else:
        loss = ce_weight * parts["ce"] + kl_weight * parts["kl"]
    return {"loss": loss, **parts}
