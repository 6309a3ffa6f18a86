"""Behaviour alignment on held-out speech: the BLSP claim, measured.

Given a clip's transcript, the frozen LM writes a continuation (the teacher's). Stage 2 trains the
adapter so that given the clip's *speech* the LM writes the same. A ``HeldoutSet`` holds held-out
clips (encoder outputs computed once) with the teacher's greedy continuations, and scores an
adapter under a condition, i.e. what the LM reads between the prompt's prefix and suffix:

* ``speech``: the clip through the adapter;
* ``shuffled``: another clip of the set through the adapter (control: does the adapter carry the
  clip's content, or only "speech-like" embeddings?);
* ``transcript``: the transcript's token embeddings (the upper bound; the KL objective's teacher).

Both stage-2 tasks are scored. Continuation: teacher-forced NLL (nats/token) of the teacher's
continuation and KL(transcript || condition) per token, the one KL(text || speech) of this
library; the greedy continuation against the teacher's (BLEU/chrF) and whether it shares a content
word with the clip. Transcription: teacher-forced NLL of the transcript, and the greedy
transcription's WER and word recall. Per-clip numbers come with every row, so two conditions can be
compared with a bootstrap interval over clips (``bootstrap_difference``). Training reports the
continuation NLL and KL over steps; the evaluate stage prints the table for the untrained adapter,
the trained one, shuffled, transcript.
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import numpy as np
import torch
import torch.nn.functional as F

from blsp_ray.config import TRANSCRIPTION_INSTRUCTION, BlspRayConfig
from blsp_ray.engines import GenerationSettings
from blsp_ray.metrics import content_words, text_metrics, word_recall
from blsp_ray.model.audio import load_audio
from blsp_ray.model.losses import continuation_forward, response_kl
from blsp_ray.model.modeling import SpeechAdapter, to_device
from blsp_ray.model.processing import IGNORE, transcript_token_ids
from blsp_ray.model.prompts import CONTINUATION_INSTRUCTION, continuation_prompt
from blsp_ray.speech_lm import SpeechLM
from blsp_ray.text import normalize_english

CONDITIONS = ("speech", "shuffled", "transcript")
TASKS = ("continuation", "transcription")


def _pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, ...] tensors -> [B, T, ...] zero-padded and lengths [B]."""
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True), torch.tensor([r.shape[0] for r in rows])


class HeldoutSet:
    """Held-out clips, their encoder outputs and the teacher's continuations, ready to score adapters.

    ``speech_lm``: the model, processor and engine (the one model + engine wrapper); its engine's
    settings are the teacher's and every greedy pass's (labelling's: greedy, its stop strings).
    ``rows``: {"text": transcript} dicts with ``waveforms`` (16 kHz float32) in the same order.
    ``instruction`` is the continuation task's, ``transcription_instruction`` the transcription task's.
    """

    def __init__(self, speech_lm: SpeechLM, rows: Sequence[dict], waveforms: Sequence[np.ndarray],
                 instruction: str = CONTINUATION_INSTRUCTION, transcription_instruction: str = TRANSCRIPTION_INSTRUCTION):
        self.blsp, self.processor, self.tokenizer = speech_lm.model, speech_lm.processor, speech_lm.tokenizer
        self.engine, self.batch_size = speech_lm.engine, speech_lm.batch_size
        self.texts = [str(r["text"]) for r in rows]
        self.instruction, self.transcription_instruction = instruction, transcription_instruction
        self.device = self.blsp.llama_model.device  # where the model is: every tensor built here goes there
        self.hidden: list[torch.Tensor] = []  # [T_i, d_model] per clip
        with torch.no_grad():
            for i in range(0, len(self.texts), self.batch_size):
                hidden, lengths = self.blsp.encode_speech(self.processor.features(waveforms[i : i + self.batch_size]).to(self.device))
                self.hidden += [h[:n] for h, n in zip(hidden, lengths.tolist())]
        # The teacher writes as in labelling: the text prompt, the engine's (labelling's) settings.
        prompts = [continuation_prompt(self.processor.prompts, t, instruction) for t in self.texts]
        self.continuations = [g.text.strip() for g in self.engine.generate(prompts)]
        self._teacher_logits: list[torch.Tensor] | None = None
        # Per clip: does the teacher's continuation share a content word with the clip (the bar the
        # table's content-word column is read against).
        self.teacher_content_word = [bool(content_words(c) & content_words(t)) for c, t in zip(self.continuations, self.texts)]

    @classmethod
    def from_config(cls, cfg: BlspRayConfig, speech_lm: SpeechLM, rows: Sequence[dict]) -> HeldoutSet:
        """A run's held-out clips (``rows`` with ``audio`` and ``text``) as training's held-out
        metrics and the evaluate stage both score them: the prompts carry stage 2's instructions,
        and ``speech_lm``'s engine generates with the labelling settings (``labelling_settings``)."""
        return cls(speech_lm, rows, [load_audio(r["audio"]) for r in rows], cfg.stage2.instruction,
                   cfg.stage2.transcription_instruction)

    def __len__(self) -> int:
        return len(self.texts)

    def _batches(self):
        for i in range(0, len(self), self.batch_size):
            yield range(i, min(i + self.batch_size, len(self)))

    def _inserted(self, idx: range, condition: str, adapter: SpeechAdapter | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the LM reads between prefix and suffix for rows ``idx``: embeds [B, S, H], lengths [B]."""
        if condition == "transcript":
            ids = [torch.tensor(transcript_token_ids(self.tokenizer, self.texts[i])) for i in idx]
            padded, lengths = _pad_rows(ids)
            return self.blsp.llama_model.get_input_embeddings()(padded.to(self.device)), lengths.to(self.device)
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r} (one of {CONDITIONS})")
        src = [(i + 1) % len(self) if condition == "shuffled" else i for i in idx]  # shuffled: the next clip's speech
        hidden, lengths = _pad_rows([self.hidden[j] for j in src])
        dtype = next(adapter.parameters()).dtype  # the adapter's, which may differ from a frozen LM's (stage2.frozen_lm_dtype)
        return self.blsp.select_speech_positions(*adapter(hidden.to(dtype), lengths.to(self.device)))

    def _task(self, task: str) -> tuple[str, list[str]]:
        """A task's instruction and its per-clip targets."""
        if task == "continuation":
            return self.instruction, self.continuations
        if task == "transcription":
            return self.transcription_instruction, self.texts
        raise ValueError(f"unknown task {task!r} (one of {TASKS})")

    def _prompt(self, idx: range, task: str, with_targets: bool) -> dict:
        instruction, targets = self._task(task)
        examples = [self.processor.speech_prompt(instruction, targets[i] if with_targets else None) for i in idx]
        return to_device(self.processor.collate_speech(examples), self.device)

    def _logits(self, idx: range, condition: str, adapter: SpeechAdapter | None, task: str = "continuation"):
        """Logits [N, V] where a target token is predicted, those tokens [N], and each clip's count [B]."""
        prompt = self._prompt(idx, task, with_targets=True)
        embeds, lengths = self._inserted(idx, condition, adapter)
        logits, targets = continuation_forward(self.blsp, prompt, embeds, lengths)
        return logits, targets, (prompt["suffix_labels"] != IGNORE).sum(1).tolist()  # rows in clip order

    @staticmethod
    def _clip_nats(logits: torch.Tensor, targets: torch.Tensor, per_clip: list[int]) -> list[float]:
        """Each clip's summed NLL (nats) of its target tokens; ``per_clip``: their counts, clips in order."""
        losses = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
        return [float(x.sum()) for x in losses.split(per_clip)]

    @torch.no_grad()
    def teacher_forced(self, adapter: SpeechAdapter | None, condition: str = "speech") -> dict:
        """Continuation: NLL (nats/token) of the teacher's continuations (+EOS) and KL(transcript || condition)
        per token; ``clip_nats`` / ``clip_tokens``: each clip's summed NLL and its token count."""
        if self._teacher_logits is None:
            self._teacher_logits = [self._logits(idx, "transcript", None)[0] for idx in self._batches()]
        kl, nats, counts = 0.0, [], []
        for idx, teacher in zip(self._batches(), self._teacher_logits):
            student, targets, per_clip = self._logits(idx, condition, adapter)
            nats += self._clip_nats(student, targets, per_clip)
            counts += per_clip
            kl += float(response_kl(student, teacher, temperature=1.0)) * len(targets)  # the batch's mean, summed back
        tokens = sum(counts)
        return {"nll": sum(nats) / tokens, "kl": kl / tokens, "clip_nats": nats, "clip_tokens": counts}

    @torch.no_grad()
    def clip_nll(self, adapter: SpeechAdapter | None, condition: str, task: str) -> tuple[np.ndarray, np.ndarray]:
        """Per clip: summed NLL (nats) of the task's target (+EOS), and its token count."""
        nats, counts = [], []
        for idx in self._batches():
            logits, targets, per_clip = self._logits(idx, condition, adapter, task)
            nats += self._clip_nats(logits, targets, per_clip)
            counts += per_clip
        return np.asarray(nats), np.asarray(counts, dtype=np.float64)

    @torch.no_grad()
    def greedy(self, adapter: SpeechAdapter | None, condition: str, task: str) -> list[str]:
        out = []
        for idx in self._batches():
            prompt = self._prompt(idx, task, with_targets=False)
            embeds, lengths = self._inserted(idx, condition, adapter)
            inputs, mask, _ = self.blsp.splice(prompt["prefix_ids"], prompt["prefix_mask"], embeds, lengths,
                                               prompt["suffix_ids"], prompt["suffix_mask"])  # [B, L, H], right-padded
            rows = [inputs[i, : int(mask[i].sum())] for i in range(len(idx))]
            out += [g.text.strip() for g in self.engine.generate_embeds(rows)]
        return out

    def alignment(self, adapter: SpeechAdapter | None, condition: str) -> dict:
        """Continuation: ``teacher_forced``, and the greedy continuations (``continuations``) with
        their BLEU/chrF against the teacher's."""
        row = self.teacher_forced(adapter, condition)
        continuations = self.greedy(adapter, condition, "continuation")
        aligned = text_metrics(continuations, self.continuations, ("bleu", "chrf"))
        return {**row, "chrf": aligned["chrf"], "bleu": aligned["bleu"], "continuations": continuations}

    def scores(self, adapter: SpeechAdapter | None, condition: str) -> dict:
        """Every metric of one table row: ``alignment``, the transcription task's NLL, WER and word
        recall, the share of greedy continuations that share a content word with the clip, and
        the per-clip numbers behind them (``per_clip``) for bootstrap intervals."""
        row = self.alignment(adapter, condition)
        continuations = row.pop("continuations")
        cont_nats, cont_tokens = row.pop("clip_nats"), row.pop("clip_tokens")
        nats, tokens = self.clip_nll(adapter, condition, "transcription")
        transcripts = self.greedy(adapter, condition, "transcription")
        errors, words = clip_word_errors(transcripts, self.texts)
        shares = [bool(content_words(c) & content_words(t)) for c, t in zip(continuations, self.texts)]
        row.update({
            "transcription_nll": float(nats.sum() / tokens.sum()),
            "wer": float(errors.sum() / words.sum()),
            "word_recall": float(np.mean([word_recall(h, r) for h, r in zip(transcripts, self.texts)])),
            "content_word": float(np.mean(shares)),
        })
        row["per_clip"] = {"continuation_nats": cont_nats, "continuation_tokens": cont_tokens,
                           "transcription_nats": nats.tolist(), "transcription_tokens": tokens.tolist(),
                           "word_errors": errors.tolist(), "words": words.tolist(), "content_word": shares}
        row["examples"] = [{"text": t, "transcription": h, "continuation": g, "teacher": c}
                           for t, h, g, c in zip(self.texts, transcripts, continuations, self.continuations)]
        return row


def labelling_settings(cfg: BlspRayConfig) -> GenerationSettings:
    """How a held-out set's engine generates: as labelling did (greedy, its stop strings and length),
    so the teacher's continuations are what stage 2 learnt from."""
    return GenerationSettings.from_config(cfg.label)


def clip_word_errors(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per clip, after Whisper's English normalisation: word errors (substitutions + deletions +
    insertions) and reference words. Their sums' ratio is the corpus WER."""
    errors, words = [], []
    for hyp, ref in zip(hypotheses, references, strict=True):
        ref_words, hyp_words = normalize_english(ref).split(), normalize_english(hyp).split()
        if not ref_words:
            errors.append(len(hyp_words))
        else:
            out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
            errors.append(out.substitutions + out.deletions + out.insertions)
        words.append(len(ref_words))
    return np.asarray(errors, dtype=np.float64), np.asarray(words, dtype=np.float64)


def bootstrap_difference(num_a, den_a, num_b, den_b, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b) over the same clips, and its 95% bootstrap
    interval (clips resampled with replacement, the pair kept together): (difference, low, high)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    n = len(arrays[0])
    picks = np.random.default_rng(seed).integers(0, n, size=(draws, n))  # [draws, n]
    na, da, nb, db = (x[picks].sum(1) for x in arrays)
    diffs = na / np.maximum(da, 1e-12) - nb / np.maximum(db, 1e-12)
    point = arrays[0].sum() / max(arrays[1].sum(), 1e-12) - arrays[2].sum() / max(arrays[3].sum(), 1e-12)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(point), float(low), float(high)
