"""BLSP as a native vLLM multimodal model: audio in a prompt, the LM's continuous batching out.

vLLM's out-of-tree model for an exported BLSP checkpoint (``blsp_ray.model.export``), registered by
the ``vllm.general_plugins`` entry point ``register`` in every vLLM process, so stock ``vllm serve
<export>``, ``vllm.LLM``, Ray Serve LLM and Ray Data LLM load it by its ``architectures``.

* ``BlspForConditionalGeneration``: Whisper encoder -> ``SpeechAdapter`` -> vLLM's Llama. The speech
  path is ``modeling.py``'s own code (``whisper_encode``, ``SpeechAdapter``), so the embeddings are
  those ``BlspModel`` splices; the LM is vLLM's, with its paged KV cache and batching.
* ``BlspMultiModalProcessor``: each audio item -> Whisper log-mel features (``processing.log_mel``,
  the features training read) and the prompt's one ``SPEECH_TOKEN`` -> one placeholder per speech
  embedding the LM will read. vLLM needs that count before it schedules the request: with
  ``speech_positions: all`` it follows from the clip's length (the conv strides); with
  ``ctc_tokens`` it depends on what the adapter reads, so the processor runs Whisper + adapter +
  ``read_speech_tokens`` itself (``SpeechReader``, on CPU) and hands the engine the embeddings.

The multimodal processor and model interfaces below are vLLM's, as ``ultravox.py`` of vLLM 0.32
uses them; they change between vLLM minor versions, which is why the ``cpu`` and ``gpu`` extras pin
the same vLLM release.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, BatchFeature, LlamaConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from blsp_ray.model.audio import SAMPLE_RATE
from blsp_ray.model.export import ARCHITECTURE, SPEECH_TOKEN
from blsp_ray.model.modeling import (
    BlspConfig,
    SpeechAdapter,
    SpeechBatch,
    conv_output_lengths,
    read_speech_tokens,
    whisper_encode,
)
from blsp_ray.model.processing import HOP_LENGTH, log_mel

MAX_CLIP_S = 30  # Whisper's window: the longest clip one placeholder run stands for


class BlspVllmConfig(BlspConfig):
    """``BlspConfig`` as vLLM reads it: ``get_text_config`` is the LM's config (vLLM sizes its KV
    cache, context and sampler by it), one instance per config so what vLLM sets in it stays.
    Registered for ``model_type: blsp`` in vLLM processes only; ``BlspModel`` keeps ``BlspConfig``,
    whose text config transformers takes to be the whole model's."""

    def __init__(self, **kwargs):
        # Its own __init__: transformers makes a config subclass without one a dataclass whose
        # generated __init__ skips BlspConfig's.
        super().__init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> LlamaConfig | BlspVllmConfig:
        if "llama_config" not in self.__dict__:  # PretrainedConfig.__init__ asks before it is set
            return self
        if "_lm_config" not in self.__dict__:
            self.__dict__["_lm_config"] = LlamaConfig(**self.llama_config)
        return self.__dict__["_lm_config"]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_lm_config", None)  # get_text_config's instance: llama_config holds the same
        return out


def speech_embedding_count(frames: int, config: BlspConfig) -> int:
    """Adapter output positions of a clip of ``frames`` log-mel frames: Whisper's conv2 and each
    subsampler conv halve the length (``conv_output_lengths``)."""
    return int(conv_output_lengths(torch.tensor([frames]), 1 + len(config.kernel_sizes))[0])


class SpeechReader(nn.Module):
    """Whisper + adapter + the LM's token embeddings, read from an export's weights: what the
    processor runs for ``speech_positions: ctc_tokens``, whose kept positions it must count
    before the engine sees the request. It computes in the engine's ``dtype``, as ``BlspModel``
    loaded in that dtype does (bfloat16: 0.064 s a held-out mini clip against 0.11 s in float32,
    2 CPUs)."""

    def __init__(self, model_dir: str, config: BlspConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.whisper_model = WhisperEncoder(config.whisper)
        self.speech_adapter = SpeechAdapter.create(config.whisper.d_model, config.llama.hidden_size,
                                                   config.kernel_sizes, config.adapter_inner_dim)
        state, table = {}, None
        for shard in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for key in f.keys():
                    if key.startswith(("whisper_model.", "subsampler.", "adapter.", "speech_ln.")):
                        state[key] = f.get_tensor(key)
                    elif key == "llama_model.model.embed_tokens.weight":
                        table = f.get_tensor(key)
        if table is None:
            raise ValueError(f"{model_dir}: no llama_model.model.embed_tokens.weight to read speech tokens against")
        self.whisper_model.load_state_dict({k.removeprefix("whisper_model."): v for k, v in state.items()
                                            if k.startswith("whisper_model.")})
        self.speech_adapter.load_state_dict({k: v for k, v in state.items() if not k.startswith("whisper_model.")})
        self.register_buffer("table", table, persistent=False)
        self.to(dtype).eval()

    @torch.no_grad()
    def forward(self, speech: SpeechBatch) -> list[torch.Tensor]:
        """Mel features -> the kept speech embeddings of each clip, [S_i, H] each."""
        hidden, lengths = whisper_encode(self.whisper_model, speech, self.config.pad_audio_to_30s)
        embeds, lengths = read_speech_tokens(*self.speech_adapter(hidden, lengths), self.table, self.config.token_score)
        return [embeds[i, : int(n)] for i, n in enumerate(lengths)]


@functools.lru_cache(maxsize=2)
def speech_reader(model_dir: str, dtype: torch.dtype) -> SpeechReader:
    return SpeechReader(model_dir, BlspVllmConfig.from_pretrained(model_dir), dtype)


class BlspProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> BlspConfig:
        return self.ctx.get_hf_config(BlspConfig)

    def get_feature_extractor(self) -> WhisperFeatureExtractor:
        return _feature_extractor(self.ctx.model_config.model)

    def get_data_parser(self) -> MultiModalDataParser:
        # Mono at Whisper's rate: vLLM resamples other rates (its default resampler, torchaudio).
        return MultiModalDataParser(target_sr=SAMPLE_RATE, target_channels=1,
                                    expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"audio": speech_embedding_count(MAX_CLIP_S * SAMPLE_RATE // HOP_LENGTH, self.get_hf_config())}

    def speech_token_id(self) -> int:
        return int(self.get_hf_config().speech_token_id)


@functools.lru_cache(maxsize=4)
def _feature_extractor(model_dir: str) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor.from_pretrained(model_dir)


class BlspDummyInputsBuilder(BaseDummyInputsBuilder[BlspProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return SPEECH_TOKEN * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions) -> MultiModalDataDict:
        return {"audio": self._get_dummy_audios(length=MAX_CLIP_S * SAMPLE_RATE, num_audios=mm_counts.get("audio", 0),
                                                overrides=mm_options.get("audio"))}


class BlspMultiModalProcessor(BaseMultiModalProcessor[BlspProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Audio items -> ``speech_features`` [n_mels, F_i] and ``speech_frames`` per clip, or for
        ``ctc_tokens`` ``speech_embeds`` [S_i, H]; each clip on its own as in training."""
        config = self.info.get_hf_config()
        extractor = self.info.get_feature_extractor()
        speech = [log_mel(extractor, [np.asarray(wave, dtype=np.float32)], config.pad_audio_to_30s)
                  for wave in hf_data.get("audio", [])]
        if config.speech_positions == "ctc_tokens":  # the engine gets the embeddings, not the features
            model_config = self.info.ctx.model_config
            reader = speech_reader(model_config.model, model_config.dtype)
            return BatchFeature({"speech_embeds": [reader(s)[0] for s in speech]})
        return BatchFeature({"speech_features": [s.features[0] for s in speech],
                             "speech_frames": torch.tensor([int(s.frame_lengths[0]) for s in speech])})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "speech_features": MultiModalFieldConfig.batched("audio"),
            "speech_frames": MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
            "speech_embeds": MultiModalFieldConfig.batched("audio"),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        token = self.info.speech_token_id()
        data = out_mm_kwargs.get_data()

        def placeholders(i: int) -> list[int]:
            if "speech_embeds" in data:
                return [token] * int(data["speech_embeds"][i].shape[0])
            return [token] * speech_embedding_count(int(data["speech_frames"][i]), config)

        return [PromptReplacement(modality="audio", target=[token], replacement=placeholders)]


@MULTIMODAL_REGISTRY.register_processor(BlspMultiModalProcessor, info=BlspProcessingInfo,
                                        dummy_inputs=BlspDummyInputsBuilder)
class BlspForConditionalGeneration(nn.Module, SupportsMultiModal):
    """vLLM's BLSP: the state-dict names are ``BlspModel``'s (``whisper_model.``, ``subsampler.``,
    ``adapter.``, ``speech_ln.``, ``llama_model.``), so an export's weights load as saved."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return SPEECH_TOKEN
        raise ValueError(f"BLSP hears audio only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: BlspConfig = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, "audio"):
            self.whisper_model = WhisperEncoder(config.whisper)
            fresh = SpeechAdapter.create(config.whisper.d_model, config.llama.hidden_size, config.kernel_sizes,
                                         config.adapter_inner_dim)
            self.subsampler, self.adapter, self.speech_ln = fresh.subsampler, fresh.adapter, fresh.speech_ln
        with self._mark_language_model(vllm_config):
            self.llama_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=vllm_config.model_config.hf_text_config,
                prefix=maybe_prefix(prefix, "llama_model"), architectures=["LlamaForCausalLM"])
        # The speech token is the export's own (added to the LM's tokenizer), often past the LM's
        # vocabulary: vLLM then masks it out before embedding text.
        self.configure_mm_token_handling(vllm_config.model_config.hf_text_config.vocab_size, [int(config.speech_token_id)])
        self.make_empty_intermediate_tensors = self.llama_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """The speech embeddings of each audio item in the batch, [S_i, H] each, in order."""
        if kwargs.get("speech_embeds") is not None:  # ctc_tokens: the processor read them
            return [e.to(self.speech_ln.weight.dtype) for e in kwargs["speech_embeds"]]
        features = kwargs.get("speech_features")
        if features is None:
            return []
        frames = torch.as_tensor(kwargs["speech_frames"]).reshape(-1)
        width = max(int(f.shape[-1]) for f in features)
        batch = torch.stack([nn.functional.pad(f, (0, width - f.shape[-1])) for f in features])  # [B, n_mels, F]
        device = self.speech_ln.weight.device
        hidden, lengths = whisper_encode(self.whisper_model, SpeechBatch(batch.to(device), frames.to(device)),
                                         self.config.pad_audio_to_30s)
        adapter = SpeechAdapter(self.subsampler, self.adapter, self.speech_ln)
        embeds, lengths = adapter(hidden.to(self.speech_ln.weight.dtype), lengths)  # [B, S, H]
        return [embeds[i, : int(n)] for i, n in enumerate(lengths)]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.llama_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.llama_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in each of its processes."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{ARCHITECTURE}")
    try:
        AutoConfig.register(BlspConfig.model_type, BlspVllmConfig)
    except ValueError:  # registered already in this process
        pass
