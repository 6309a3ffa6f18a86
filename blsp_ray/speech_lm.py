"""Multi-turn speech chat on a BLSP model: turns -> one embedded prompt -> a streamed reply.

A conversation is a list of turns (instruction text, optional speech, the assistant's reply for
past turns), laid out as the seed's chat demo does (``prompts.chat_turn_parts``). The turns are
spliced with ``BlspModel.splice`` as one right-padded batch (one row per turn) and the real
positions of the rows, in order, are the prompt embeddings [L, hidden] that any engine takes
(transformers ``inputs_embeds``, vLLM ``prompt_embeds``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from blsp_ray.model.modeling import ADAPTER_CONFIG, BlspModel, load_blsp
from blsp_ray.model.processing import IGNORE, BlspProcessor
from blsp_ray.model.prompts import chat_turn_parts


@dataclass
class ChatTurn:
    instruction: str = ""
    speech: np.ndarray | None = None  # [T] float32, 16 kHz mono
    reply: str | None = None  # the assistant's answer; None for the turn being answered


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy, as the seed
    top_p: float = 1.0
    seed: int | None = None


class _Cancelled(StoppingCriteria):
    """Stops generation when the caller gives up (client gone, timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """Text deltas of one reply; ``completion_tokens`` and ``finish_reason`` are set once exhausted."""

    def __init__(self, deltas: Iterator[str], prompt_tokens: int):
        self._deltas = deltas
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)


def checkpoint_bases(path: str | os.PathLike) -> tuple[str, str]:
    """(LM dir, Whisper dir) holding the tokenizer and feature extractor of a BLSP checkpoint."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).exists():
        meta = json.loads((path / ADAPTER_CONFIG).read_text())
        return meta["lm_path"], meta["whisper_path"]
    return str(path), str(path)  # a full checkpoint carries both


class BlspChat:
    """A BLSP model + processor that embeds conversations and streams replies with transformers."""

    def __init__(self, model: BlspModel, processor: BlspProcessor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, dtype: str = "float32") -> BlspChat:
        model = load_blsp(path, dtype=getattr(torch, dtype))
        lm_path, whisper_path = checkpoint_bases(path)
        processor = BlspProcessor.from_paths(lm_path, whisper_path, model.config.pad_audio_to_30s)
        return cls(model, processor)

    @property
    def max_context(self) -> int:
        return int(self.model.llama_model.config.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.model.llama_model.config.hidden_size)

    @torch.no_grad()
    def prompt_embeds(self, turns: Sequence[ChatTurn], header: str = "") -> torch.Tensor:
        """The conversation as LM input embeddings [L, hidden], ending where the reply starts."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        examples = []
        for i, turn in enumerate(turns):
            prefix, suffix = chat_turn_parts(turn.instruction, turn.reply, header if i == 0 else "")
            suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
            examples.append(
                {
                    "prefix_ids": self.tokenizer(prefix, add_special_tokens=i == 0)["input_ids"],  # BOS once
                    "suffix_ids": suffix_ids,
                    "suffix_labels": [IGNORE] * len(suffix_ids),
                }
            )
        batch = self.processor.collate_speech(examples)
        speech_embeds = speech_lengths = None
        with_speech = [i for i, t in enumerate(turns) if t.speech is not None]
        if with_speech:
            feats = self.processor.features([turns[i].speech for i in with_speech])
            embeds, lengths = self.model.speech_embeddings(feats)  # [N, S, H], [N]
            speech_embeds = embeds.new_zeros(len(turns), *embeds.shape[1:])  # turns without speech: 0 frames
            speech_lengths = torch.zeros(len(turns), dtype=torch.long)
            speech_embeds[with_speech] = embeds
            speech_lengths[with_speech] = lengths
        inputs, attention, _ = self.model.splice(
            batch["prefix_ids"], batch["prefix_mask"], speech_embeds, speech_lengths,
            batch["suffix_ids"], batch["suffix_mask"],
        )
        # Right padding: the real positions in row-major order are the turns, in order.
        return inputs[attention.bool()]  # [L, H]

    def stream(
        self, prompt_embeds: torch.Tensor, settings: SamplingSettings, cancel: threading.Event | None = None
    ) -> ChatStream:
        """Generate from prompt embeddings [L, H] on a thread; iterate the returned stream for text deltas."""
        cancel = cancel or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        gen_kwargs = dict(
            inputs_embeds=prompt_embeds[None].to(self.model.llama_model.dtype),  # [1, L, H]
            attention_mask=torch.ones(1, prompt_embeds.shape[0], dtype=torch.long),
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.temperature > 0,
            pad_token_id=self.processor.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
        )
        if settings.temperature > 0:
            gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        result: dict = {}

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.no_grad():
                    result["ids"] = self.model.llama_model.generate(**gen_kwargs)[0]  # new tokens only
            except BaseException as err:  # surfaced to the consumer below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="blsp-generate", daemon=True)
        stream = ChatStream(iter(()), prompt_tokens=int(prompt_embeds.shape[0]))

        def deltas() -> Iterator[str]:
            thread.start()
            try:
                for text in streamer:
                    if text:
                        yield text
            finally:
                cancel.set()  # a consumer that stops early ends the generation too
                thread.join()
            if "error" in result:
                raise result["error"]
            ids = result["ids"]
            stream.completion_tokens = int(ids.shape[0])
            ended = stream.completion_tokens and int(ids[-1]) == self.tokenizer.eos_token_id
            stream.completion_tokens -= 1 if ended else 0  # EOS is not part of the reply
            stream.finish_reason = "stop" if ended or stream.completion_tokens < settings.max_new_tokens else "length"

        stream._deltas = deltas()
        return stream
