"""Tokenisation, Whisper features and batching: the one place examples become tensors."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, WhisperFeatureExtractor

from blsp_ray.model.audio import SAMPLE_RATE, check_duration
from blsp_ray.model.modeling import SpeechBatch
from blsp_ray.model.prompts import PromptFormatName, make_prompt_format

IGNORE = -100
HOP_LENGTH = 160  # samples per Whisper log-mel frame at SAMPLE_RATE (10 ms)


def as_ids(value) -> list[int]:
    """A row's token ids (numpy array, list) as a list of ints."""
    return [int(v) for v in value]


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local LM directory, loaded once per process."""
    return AutoTokenizer.from_pretrained(path)


def pad_ids(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad a list of id lists -> [B, max_len] long."""
    out = torch.full((len(seqs), max((len(s) for s in seqs), default=0)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def transcript_token_ids(tokenizer: PreTrainedTokenizerBase, transcript: str) -> list[int]:
    """The transcript's tokens as they stand where the speech would (labelling's prompt reads
    "<instruction> <transcript>"): what the KL objective's teacher and the held-out upper bound read."""
    return tokenizer(" " + str(transcript), add_special_tokens=False)["input_ids"]


def log_mel(
    feature_extractor: WhisperFeatureExtractor, waveforms: Sequence[np.ndarray], pad_audio_to_30s: bool = False
) -> SpeechBatch:
    """16 kHz mono waveforms -> log-mel [B, n_mels, F] and real frame counts [B].

    F is the longest clip's frame count, or 3000 (30 s) with ``pad_audio_to_30s``, as the original.
    A clip of n samples has ceil(n / 160) real frames: the original's count (the extractor's
    sample mask, every 160th entry), a partial last hop included. Clips shorter than
    ``audio.MIN_SAMPLES`` raise ``AudioError`` (too_short).
    """
    if (feature_extractor.sampling_rate, feature_extractor.hop_length) != (SAMPLE_RATE, HOP_LENGTH):
        raise ValueError(f"Whisper features at {feature_extractor.sampling_rate} Hz, hop {feature_extractor.hop_length}: "
                         f"this library reads {SAMPLE_RATE} Hz audio with a {HOP_LENGTH}-sample hop")
    lengths, padded = [], []
    for i, w in enumerate(waveforms):
        w = np.asarray(w, dtype=np.float32).reshape(-1)
        check_duration(w, f"clip {i}", 0.0, math.inf)  # the one duration rule's floor (MIN_SAMPLES)
        frames = -(-len(w) // HOP_LENGTH)  # ceil
        lengths.append(frames)
        # Zeros to a whole hop, as the extractor's own padding puts there in the 30 s mode, so the
        # partial frame exists in the real-length mode too (the STFT yields samples // hop frames).
        padded.append(np.pad(w, (0, frames * HOP_LENGTH - len(w))))
    feats = feature_extractor(
        padded,
        sampling_rate=SAMPLE_RATE,
        padding="max_length" if pad_audio_to_30s else "longest",
        return_tensors="pt",
    )["input_features"]
    return SpeechBatch(features=feats, frame_lengths=torch.tensor(lengths).clamp(1, feats.shape[-1]))


class BlspProcessor:
    """Turns (instruction, speech or text, target) into model inputs, for training and inference."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        pad_audio_to_30s: bool = False,
        prompt_format: PromptFormatName = "original",
    ):
        self.tokenizer = tokenizer
        self.prompts = make_prompt_format(prompt_format, tokenizer)
        self.feature_extractor = feature_extractor
        self.pad_audio_to_30s = pad_audio_to_30s
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_paths(cls, lm_path: str | os.PathLike, whisper_path: str | os.PathLike, pad_audio_to_30s: bool = False,
                   prompt_format: PromptFormatName = "original"):
        return cls(
            AutoTokenizer.from_pretrained(lm_path),
            WhisperFeatureExtractor.from_pretrained(whisper_path),
            pad_audio_to_30s,
            prompt_format,
        )

    # ---- text -------------------------------------------------------------------------------

    def _target_ids(self, target: str) -> list[int]:
        return self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def text_example(self, instruction: str, response: str, max_tokens: int | None = None) -> dict:
        """Stage 1: prompt + response + EOS; loss only on the response (prompt labels -100)."""
        prompt = self.tokenizer(self.prompts.text_prompt(instruction))["input_ids"]
        target = self._target_ids(response)
        ids = (prompt + target)[:max_tokens]
        labels = ([IGNORE] * len(prompt) + target)[:max_tokens]
        return {"input_ids": ids, "labels": labels}

    def collate_text(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = pad_ids([e["input_ids"] for e in examples], self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": pad_ids([[1] * len(e["input_ids"]) for e in examples], 0),
            "labels": pad_ids([e["labels"] for e in examples], IGNORE),
        }

    # ---- speech -------------------------------------------------------------------------------

    def speech_prompt(self, instruction: str, target: str | None = None) -> dict:
        """Stage 2 / inference token ids around the speech: prefix, suffix (+ target + EOS)."""
        prefix, suffix = self.prompts.speech_prompt_parts(instruction)
        prefix_ids = self.tokenizer(prefix)["input_ids"]
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        labels = [IGNORE] * len(suffix_ids)
        if target is not None:
            target_ids = self._target_ids(target)
            suffix_ids, labels = suffix_ids + target_ids, labels + target_ids
        return {"prefix_ids": prefix_ids, "suffix_ids": suffix_ids, "suffix_labels": labels}

    def features(self, waveforms: Sequence[np.ndarray]) -> SpeechBatch:
        """16 kHz mono waveforms -> log-mel [B, n_mels, F] and real frame counts [B]."""
        return log_mel(self.feature_extractor, waveforms, self.pad_audio_to_30s)

    def collate_speech(self, examples: Sequence[dict], waveforms: Sequence[np.ndarray] | None = None) -> dict:
        """Batch speech_prompt() outputs (+ waveforms) into BlspModel.forward/generate kwargs."""
        batch = {
            "prefix_ids": pad_ids([e["prefix_ids"] for e in examples], self.pad_id),
            "prefix_mask": pad_ids([[1] * len(e["prefix_ids"]) for e in examples], 0),
            "suffix_ids": pad_ids([e["suffix_ids"] for e in examples], self.pad_id),
            "suffix_mask": pad_ids([[1] * len(e["suffix_ids"]) for e in examples], 0),
            "suffix_labels": pad_ids([e["suffix_labels"] for e in examples], IGNORE),
        }
        if waveforms is not None:
            batch["speech"] = self.features(waveforms)
        return batch
