"""Behaviour alignment on held-out speech: the BLSP claim, measured.

Given a clip's transcript, the frozen LM writes a continuation (the teacher's). Stage 2 trains the
adapter so that given the clip's *speech* the LM writes the same. A ``HeldoutSet`` holds held-out
clips (encoder outputs computed once) with the teacher's greedy continuations, and scores an
adapter under a condition, i.e. what the LM reads between the prompt's prefix and suffix:

* ``speech``: the clip through the adapter;
* ``shuffled``: another clip of the set through the adapter (control: does the adapter carry the
  clip's content, or only "speech-like" embeddings?);
* ``transcript``: the transcript's token embeddings (the upper bound; the KL objective's teacher).

Teacher-forced on the teacher's continuation: NLL (nats/token) and KL(transcript || condition) per
token, the one KL(text || speech) of this library. Greedy: the continuation against the teacher's
(BLEU/chrF), and a transcription (WER, word recall against the transcript). Training reports the
teacher-forced numbers over steps; the evaluate stage reports the trained adapter's alignment and
prints the table for the untrained adapter, the trained one, shuffled, transcript.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blsp_ray.config import BlspRayConfig
from blsp_ray.engines import GenerationSettings, TransformersEngine
from blsp_ray.metrics import text_metrics, word_recall
from blsp_ray.model.audio import load_audio
from blsp_ray.model.losses import continuation_forward, response_kl
from blsp_ray.model.modeling import SpeechAdapter, to_device
from blsp_ray.model.processing import transcript_token_ids
from blsp_ray.model.prompts import CONTINUATION_INSTRUCTION, continuation_prompt
from blsp_ray.text import normalize_english

CONDITIONS = ("speech", "shuffled", "transcript")
TRANSCRIBE_INSTRUCTION = "Please transcribe the following audio."


def _pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, ...] tensors -> [B, T, ...] zero-padded and lengths [B]."""
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True), torch.tensor([r.shape[0] for r in rows])


class HeldoutSet:
    """Held-out clips, their encoder outputs and the teacher's continuations, ready to score adapters.

    ``rows``: {"text": transcript} dicts with ``waveforms`` (16 kHz float32) in the same order.
    """

    def __init__(self, blsp, processor, rows: Sequence[dict], waveforms: Sequence[np.ndarray],
                 settings: GenerationSettings, batch_size: int = 16, instruction: str = CONTINUATION_INSTRUCTION):
        self.blsp, self.processor, self.tokenizer = blsp, processor, processor.tokenizer
        self.texts = [str(r["text"]) for r in rows]
        self.instruction, self.batch_size = instruction, batch_size
        self.device = blsp.llama_model.device  # where the model is: every tensor built here goes there
        self.hidden: list[torch.Tensor] = []  # [T_i, d_model] per clip
        with torch.no_grad():
            for i in range(0, len(self.texts), batch_size):
                hidden, lengths = blsp.encode_speech(processor.features(waveforms[i : i + batch_size]).to(self.device))
                self.hidden += [h[:n] for h, n in zip(hidden, lengths.tolist())]
        # The teacher writes as in labelling: the text prompt, the labelling settings (greedy, stops).
        self.engine = TransformersEngine(blsp.llama_model, self.tokenizer, settings, batch_size)
        self.continuations = [g.text.strip() for g in self.engine.generate([continuation_prompt(t, instruction) for t in self.texts])]
        self._teacher_logits: list[torch.Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: BlspRayConfig, blsp, processor, rows: Sequence[dict], batch_size: int = 16) -> HeldoutSet:
        """A run's held-out clips (``rows`` with ``audio`` and ``text``) as training's held-out
        metrics and the evaluate stage both score them: the teacher writes with the labelling
        settings, every prompt carries ``stage2.instruction``."""
        return cls(blsp, processor, rows, [load_audio(r["audio"]) for r in rows],
                   GenerationSettings.from_config(cfg.label), batch_size, cfg.stage2.instruction)

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
        dtype = next(p for p in self.blsp.llama_model.parameters()).dtype
        embeds, lengths = adapter(hidden.to(dtype), lengths.to(self.device))
        return embeds, lengths

    def _prompt(self, idx: range, instruction: str, with_targets: bool) -> dict:
        examples = [self.processor.speech_prompt(instruction, self.continuations[i] if with_targets else None) for i in idx]
        return to_device(self.processor.collate_speech(examples), self.device)

    @torch.no_grad()
    def teacher_forced(self, adapter: SpeechAdapter | None, condition: str = "speech") -> dict[str, float]:
        """NLL (nats/token) of the teacher's continuations (+EOS) and KL(transcript || condition) per token."""
        if self._teacher_logits is None:
            self._teacher_logits = [self._logits(idx, "transcript", None)[0] for idx in self._batches()]
        nll = kl = tokens = 0.0
        for idx, teacher in zip(self._batches(), self._teacher_logits):
            student, targets = self._logits(idx, condition, adapter)
            nll += float(F.cross_entropy(student.float(), targets, reduction="sum"))
            kl += float(response_kl(student, teacher, temperature=1.0)) * len(targets)  # the batch's mean, summed back
            tokens += len(targets)
        return {"nll": nll / tokens, "kl": kl / tokens}

    def _logits(self, idx: range, condition: str, adapter: SpeechAdapter | None) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self._prompt(idx, self.instruction, with_targets=True)
        embeds, lengths = self._inserted(idx, condition, adapter)
        return continuation_forward(self.blsp, prompt, embeds, lengths)  # [N, V], [N]

    @torch.no_grad()
    def greedy(self, adapter: SpeechAdapter | None, condition: str, instruction: str) -> list[str]:
        out = []
        for idx in self._batches():
            prompt = self._prompt(idx, instruction, with_targets=False)
            embeds, lengths = self._inserted(idx, condition, adapter)
            inputs, mask, _ = self.blsp.splice(prompt["prefix_ids"], prompt["prefix_mask"], embeds, lengths,
                                               prompt["suffix_ids"], prompt["suffix_mask"])  # [B, L, H], right-padded
            rows = [inputs[i, : int(mask[i].sum())] for i in range(len(idx))]
            out += [g.text.strip() for g in self.engine.generate_embeds(rows)]
        return out

    def alignment(self, adapter: SpeechAdapter | None, condition: str) -> dict:
        """Teacher-forced NLL and KL, and the greedy continuations (``continuations``) with their
        BLEU/chrF against the teacher's."""
        row = self.teacher_forced(adapter, condition)
        continuations = self.greedy(adapter, condition, self.instruction)
        aligned = text_metrics(continuations, self.continuations, ("bleu", "chrf"))
        return {**row, "chrf": aligned["chrf"], "bleu": aligned["bleu"], "continuations": continuations}

    def scores(self, adapter: SpeechAdapter | None, condition: str) -> dict[str, float]:
        """Every metric of one table row: ``alignment`` plus a transcription's WER and word recall."""
        row = self.alignment(adapter, condition)
        continuations = row.pop("continuations")
        transcripts = self.greedy(adapter, condition, TRANSCRIBE_INSTRUCTION)
        wer = text_metrics([normalize_english(t) for t in transcripts], [normalize_english(t) for t in self.texts], ("wer",))
        row.update({"wer": wer["wer"],
                    "word_recall": float(np.mean([word_recall(h, r) for h, r in zip(transcripts, self.texts)]))})
        row["examples"] = [{"text": t, "teacher": c, "continuation": g, "transcription": h}
                           for t, c, g, h in list(zip(self.texts, self.continuations, continuations, transcripts))[:3]]
        return row
