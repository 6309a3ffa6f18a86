"""The one wrapper around a BLSP model and its engine: checkpoint -> clips or chat turns -> prompts
-> generation. Batch generation, the chat service, the held-out table and stage 2's held-out
metrics use it. Clips get stage 2's [prefix | speech | suffix] prompt; a conversation's turns
(instruction text, optional speech, the assistant's reply for past turns) are laid out by the
checkpoint's prompt format (``PromptFormat.chat_turn_parts``). Two engines, two prompt kinds:

* ``vllm``: the checkpoint exported once per node (``model/export.py``) and loaded by vLLM as the
  native BLSP model (``model/vllm_blsp.py``), which hears for itself: prompts are ``AudioPrompt``s,
  token ids with one speech token per clip, plus the clips (``clip_prompts``, ``audio_prompt``).
  A ``VllmEngine`` (batch) or an ``AsyncVllmEngine`` (serving).
* ``transformers``: Whisper + adapter run here and the LM reads LM-space prompt embeddings [L,
  hidden], spliced with ``BlspModel.splice`` (``speech_prompt_embeds``, ``prompt_embeds``): how
  training and the held-out metrics read the model, and the baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from blsp_ray.config import BatchEngineConfig, EngineConfig, S3Config, SpeechCheckpointConfig
from blsp_ray.engines import (
    AsyncVllmEngine,
    AudioPrompt,
    Generation,
    GenerationSettings,
    TextEngine,
    TextStream,
    TransformersEngine,
    VllmEngine,
    replica_dtype,
)
from blsp_ray.io.storage import cache_dir, is_s3, local_copy, model_cache
from blsp_ray.model.export import SPEECH_TOKEN, export_for_vllm
from blsp_ray.model.modeling import (
    ADAPTER_CONFIG,
    BlspConfig,
    BlspModel,
    SpeechBatch,
    adapter_metadata,
    checkpoint_bases,
    load_blsp,
)
from blsp_ray.model.processing import IGNORE, BlspProcessor


@dataclass
class ChatTurn:
    instruction: str = ""
    speech: np.ndarray | None = None  # [T] float32, 16 kHz mono
    reply: str | None = None  # the assistant's answer; None for the turn being answered


def vllm_export(checkpoint: str | os.PathLike, pad_audio_to_30s: bool | None = None, dtype: str = "float32") -> str:
    """The checkpoint as vLLM's native BLSP model loads it (``export_for_vllm``, weights in ``dtype``),
    written once per node and version of the checkpoint's files (``$BLSP_MODEL_CACHE``); replicas
    starting together share it."""
    path = Path(checkpoint).resolve()
    stamp = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    key = hashlib.sha1(json.dumps([str(path), stamp, pad_audio_to_30s, dtype]).encode()).hexdigest()[:16]
    target = model_cache(f"{key}-vllm")
    if not target.exists():
        with cache_dir(target) as tmp:
            export_for_vllm(path, tmp, pad_audio_to_30s, getattr(torch, dtype))
    return str(target)


def local_checkpoint(uri: str, s3: S3Config | None = None) -> str:
    """A local directory for a BLSP checkpoint given as a path or s3:// URI (copied once per node).

    An adapter-only checkpoint of an S3 run points at its frozen LM by URI (the run's stage-1
    model): then the bases are made local too, and a view of the checkpoint (links to its files,
    its adapter config naming the local copies) is what comes back, for ``load_blsp`` and vLLM.
    """
    path = Path(local_copy(uri, s3))
    meta = adapter_metadata(path)
    remote = {k: meta[k] for k in ("lm_path", "whisper_path") if is_s3(meta.get(k, ""))} if meta else {}
    if not remote:
        return str(path)
    meta.update({k: local_copy(v, s3) for k, v in remote.items()})
    view = model_cache(hashlib.sha1(json.dumps([str(path), meta]).encode()).hexdigest()[:16] + "-view")
    if not view.exists():
        with cache_dir(view) as tmp:
            for f in path.iterdir():
                if f.name != ADAPTER_CONFIG:
                    (tmp / f.name).symlink_to(f.resolve())
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return str(view)


class SpeechLM:
    """A BLSP checkpoint's processor and engine, and its model where speech is embedded here.

    ``generate(waveforms, instructions)`` takes a batch of clips and returns one ``Generation`` per
    clip, in order. A conversation: ``audio_prompt(turns, header)`` for ``AsyncVllmEngine.stream``,
    or ``prompt_embeds(turns, header)`` + ``stream(...)`` on the transformers engine.
    """

    def __init__(self, model: BlspModel | None, processor: BlspProcessor,
                 engine: TextEngine | AsyncVllmEngine | None = None, batch_size: int = 8):
        self.model = model.eval() if model is not None else None  # None: the engine hears for itself
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.engine = engine or TransformersEngine(model.llama_model, self.tokenizer, GenerationSettings(), batch_size)
        self.native = isinstance(self.engine, (VllmEngine, AsyncVllmEngine))
        if self.native:
            self.speech_token_id = self.tokenizer.convert_tokens_to_ids(SPEECH_TOKEN)
        self.batch_size = batch_size  # clips encoded per Whisper + adapter forward (transformers)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, cfg: EngineConfig, settings: GenerationSettings | None = None,
                        dtype: str = "float32", streaming: bool = False, device: str = "cpu") -> SpeechLM:
        """Load a local checkpoint (adapter-only, full, or the original release's layout) with the
        engine ``cfg.engine`` names; ``streaming`` makes that vLLM engine an ``AsyncVllmEngine``.
        ``device``: where the transformers engine runs the model (vLLM places its own)."""
        settings = settings or GenerationSettings.from_config(cfg)
        dtype = replica_dtype(dtype, cfg)
        batch_size = cfg.batch_size if isinstance(cfg, BatchEngineConfig) else 8  # serving passes one conversation at a time
        # The checkpoint's padding setting (or the config's override) is what every feature extraction reads.
        override = cfg.pad_audio_to_30s if isinstance(cfg, SpeechCheckpointConfig) else None
        if cfg.engine == "vllm":
            export = vllm_export(path, override, dtype)
            blsp_config = BlspConfig.from_pretrained(export)
            processor = BlspProcessor.from_paths(export, export, blsp_config.pad_audio_to_30s, blsp_config.prompt_format)
            engine = (AsyncVllmEngine(export, cfg, settings, dtype=dtype) if streaming
                      else VllmEngine(export, cfg, settings, dtype=dtype))
            return cls(None, processor, engine, batch_size)
        model = load_blsp(path, dtype=getattr(torch, dtype), pad_audio_to_30s=override).eval().to(device)
        lm_path, whisper_path = checkpoint_bases(path)
        processor = BlspProcessor.from_paths(lm_path, whisper_path, model.config.pad_audio_to_30s, model.config.prompt_format)
        return cls(model, processor, TransformersEngine(model.llama_model, processor.tokenizer, settings, batch_size), batch_size)

    @property
    def settings(self) -> GenerationSettings:
        return self.engine.settings

    @property
    def max_context(self) -> int:
        """Prompt + reply positions the engine takes."""
        return self.engine.max_context

    # ---- speech -> prompt embeddings ------------------------------------------------------------

    def features(self, waveforms: Sequence[np.ndarray]) -> SpeechBatch:
        return self.processor.features(waveforms)

    def _speech_embeddings(self, speech: SpeechBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel features -> speech embeddings [B, S, H] and lengths [B], on the LM's device (for splicing)."""
        embeds, lengths = self.model.speech_embeddings(speech.to(self.model.whisper_model.device))
        return embeds.to(self.model.llama_model.device), lengths.cpu()

    def _splice(self, batch: dict, speech_embeds: torch.Tensor | None, speech_lengths: torch.Tensor | None):
        """Right-padded [prefix | speech | suffix] rows: inputs_embeds [B, L, H], attention [B, L]."""
        device = self.model.llama_model.device
        inputs, attention, _ = self.model.splice(
            batch["prefix_ids"].to(device), batch["prefix_mask"].to(device), speech_embeds, speech_lengths,
            batch["suffix_ids"].to(device), batch["suffix_mask"].to(device),
        )
        return inputs, attention

    @torch.no_grad()
    def speech_prompt_embeds(self, speech: SpeechBatch, instructions: Sequence[str]) -> list[torch.Tensor]:
        """[prefix | speech | suffix] embeddings of each clip: a list of [L_i, hidden] float32 (no padding)."""
        batch = self.processor.collate_speech([self.processor.speech_prompt(i) for i in instructions])
        embeds, mask = self._splice(batch, *self._speech_embeddings(speech))  # [B, L, H], [B, L]
        return [embeds[i, : int(mask[i].sum())].float() for i in range(embeds.shape[0])]

    def turn_ids(self, turns: Sequence[ChatTurn], header: str = "") -> list[tuple[list[int], list[int]]]:
        """Each turn's (prefix ids, suffix ids), its speech (if any) going between them, laid out by
        the checkpoint's prompt format; the conversation is their concatenation, in order."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        out = []
        for i, turn in enumerate(turns):
            prefix, suffix = self.processor.prompts.chat_turn_parts(turn.instruction, turn.reply, header, first=i == 0)
            out.append((self.tokenizer(prefix, add_special_tokens=i == 0)["input_ids"],  # BOS once
                        self.tokenizer(suffix, add_special_tokens=False)["input_ids"]))
        return out

    @torch.no_grad()
    def prompt_embeds(self, turns: Sequence[ChatTurn], header: str = "") -> torch.Tensor:
        """The conversation as LM input embeddings [L, hidden], ending where the reply starts."""
        examples = [{"prefix_ids": prefix, "suffix_ids": suffix, "suffix_labels": [IGNORE] * len(suffix)}
                    for prefix, suffix in self.turn_ids(turns, header)]
        batch = self.processor.collate_speech(examples)
        speech_embeds = speech_lengths = None
        with_speech = [i for i, t in enumerate(turns) if t.speech is not None]
        if with_speech:
            embeds, lengths = self._speech_embeddings(self.features([turns[i].speech for i in with_speech]))  # [N, S, H], [N]
            speech_embeds = embeds.new_zeros(len(turns), *embeds.shape[1:])  # turns without speech: 0 frames
            speech_lengths = torch.zeros(len(turns), dtype=torch.long)
            speech_embeds[with_speech] = embeds
            speech_lengths[with_speech] = lengths
        inputs, attention = self._splice(batch, speech_embeds, speech_lengths)
        # Right padding: the real positions in row-major order are the turns, in order.
        return inputs[attention.bool()]  # [L, H]

    # ---- prompts for the native engine ------------------------------------------------------------

    def clip_prompts(self, waveforms: Sequence[np.ndarray], instructions: Sequence[str]) -> list[AudioPrompt]:
        """Each clip's [prefix | speech token | suffix] prompt with its clip."""
        prompts = []
        for wave, instruction in zip(waveforms, instructions):
            ids = self.processor.speech_prompt(instruction)
            prompts.append(AudioPrompt(ids["prefix_ids"] + [self.speech_token_id] + ids["suffix_ids"], [wave]))
        return prompts

    def audio_prompt(self, turns: Sequence[ChatTurn], header: str = "") -> AudioPrompt:
        """The conversation as token ids ending where the reply starts, a speech token where each
        turn's speech goes, and the turns' clips in order: ``prompt_embeds``'s layout (``turn_ids``)."""
        ids = []
        for turn, (prefix, suffix) in zip(turns, self.turn_ids(turns, header)):
            ids += prefix + ([self.speech_token_id] if turn.speech is not None else []) + suffix
        return AudioPrompt(ids, [t.speech for t in turns if t.speech is not None])

    # ---- generation -----------------------------------------------------------------------------

    def generate_features(self, speech: SpeechBatch, instructions: str | Sequence[str]) -> list[Generation]:
        """One generation per clip of ``speech`` (mel features [B, n_mels, F] + frame lengths [B])."""
        n = speech.features.shape[0]
        if isinstance(instructions, str):
            instructions = [instructions] * n
        prompts = []
        for s in range(0, n, self.batch_size):
            part = SpeechBatch(speech.features[s : s + self.batch_size], speech.frame_lengths[s : s + self.batch_size])
            if not self.model.config.pad_audio_to_30s:  # this part's own frames only, as in training
                part = SpeechBatch(part.features[..., : int(part.frame_lengths.max())], part.frame_lengths)
            prompts.extend(self.speech_prompt_embeds(part, instructions[s : s + self.batch_size]))
        return self.engine.generate_embeds(prompts)

    def generate(self, waveforms: Sequence[np.ndarray], instructions: str | Sequence[str]) -> list[Generation]:
        """16 kHz mono clips [T_i] -> one generation each, in order."""
        if isinstance(instructions, str):
            instructions = [instructions] * len(waveforms)
        if self.native:
            return self.engine.generate_audio(self.clip_prompts(waveforms, instructions))
        return self.generate_features(self.features(waveforms), instructions)

    def stream(self, prompt_embeds: torch.Tensor, settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> TextStream:
        """Reply to prompt embeddings [L, H] on a thread (transformers engine): iterate for text deltas."""
        if not isinstance(self.engine, TransformersEngine):
            raise TypeError(f"stream() runs on the transformers engine; {type(self.engine).__name__} streams with engine.stream()")
        return self.engine.stream_embeds(prompt_embeds, settings, cancel)
