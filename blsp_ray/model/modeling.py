"""The BLSP model: frozen Whisper encoder -> ``SpeechAdapter`` (conv subsampler -> bottleneck
adapter -> LayerNorm, the only part stage 2 trains) -> frozen LM.

Faithful to the original release's ``BlspModel`` (same sub-module and state-dict names:
``whisper_model.``, ``llama_model.``, ``subsampler.conv_layers.N.``, ``adapter.fc1/fc2``,
``speech_ln.``), so its checkpoints load as they are. Two differences, both switchable:

* Whisper input is real-length for the models we build (``ModelConfig.pad_audio_to_30s``): the
  encoder's positional embeddings are sliced to the clip, padded frames are masked out of
  attention, so a batch gives each clip the same output it would get alone.
  ``pad_audio_to_30s=True`` runs the library encoder over 30 s of padding, as the original did;
  a checkpoint of the original release (whose config does not record it) loads with it on.
* Each example is spliced as [prefix tokens | speech frames | suffix tokens] with all padding at
  one end (right for training, left for generation), never in the middle of a sequence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    WhisperConfig,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from blsp_ray.model.prompts import PROMPT_FORMATS

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "blsp_adapter.json"


SPEECH_POSITIONS = ("all", "ctc_tokens")
TOKEN_SCORES = ("dot", "distance")
# ``token_score: distance``: a position e scores SHARPNESS * (1 - |e - E_v|^2 / r^2) for token v (r^2:
# the mean squared norm of the LM's token embeddings), so it beats the blank (0) only within about one
# embedding norm of E_v. At e = E_v the token scores 8 and an unrelated one (about sqrt(2) r away) -8,
# which makes a softmax over a few thousand candidates near one-hot.
DISTANCE_SHARPNESS = 8.0


def token_scores(embeds: torch.Tensor, table: torch.Tensor, kind: str, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """How well each adapter output position reads as each LM token, against a blank at 0: the CTC
    alignment's logits and the ``ctc_tokens`` reading. ``dot``: e . E_v (the vector only has to point
    the token's way, at any length); ``distance``: closeness to E_v itself, so an emitting position is
    near the embedding the LM reads as that token. embeds [..., H], table [V, H], candidates [C]
    (rows of table; None: all) -> [..., C]."""
    rows = (table if candidates is None else table[candidates]).to(embeds.dtype)  # cast the candidates only
    if kind == "dot":
        return embeds @ rows.T
    if kind == "distance":
        squared = embeds.pow(2).sum(-1, keepdim=True) - 2 * embeds @ rows.T + rows.pow(2).sum(-1)  # |e - E_v|^2
        return DISTANCE_SHARPNESS * (1 - squared / table.pow(2).sum(-1).mean())
    raise ValueError(f"token_score must be one of {TOKEN_SCORES}, got {kind!r}")


def read_speech_tokens(embeds: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor,
                       token_score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions ``speech_positions: ctc_tokens`` keeps: where the adapter's greedy CTC reading
    emits a token. Scored against the LM's token embeddings ``table`` [V, H] (``token_scores``) and
    a blank at logit 0, as ``losses.ctc_alignment`` trains them, a position is kept when its best
    score beats the blank and its token differs from the previous position's, so the LM reads about
    one embedding per spoken token, as it reads text. A row with none keeps its most token-like
    position. The one definition, for ``BlspModel`` and the native vLLM model's processor.
    embeds [B, S, H], lengths [B] -> [B, S', H] (right-padded), lengths [B]."""
    with torch.no_grad():  # which positions: a discrete choice; the kept vectors still train
        scores = token_scores(embeds.detach().to(table.dtype), table, token_score)  # [B, S, V]
        best_score, best = scores.max(-1)  # [B, S]
        real = length_mask(lengths, embeds.shape[1])
        token = torch.where((best_score > 0) & real, best, -1)  # -1: blank (or padding)
        previous = F.pad(token[:, :-1], (1, 0), value=-1)
        keep = (token >= 0) & (token != previous)  # [B, S]
        fallback = best_score.masked_fill(~real, float("-inf")).argmax(1)  # [B]
        keep[torch.arange(len(keep)), fallback] |= ~keep.any(1)
    rows = [embeds[b][keep[b]] for b in range(embeds.shape[0])]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), keep.sum(1).to(lengths.dtype)


class BlspConfig(PretrainedConfig):
    model_type = "blsp"

    def __init__(
        self,
        whisper_config: dict | None = None,
        llama_config: dict | None = None,
        conv_kernel_sizes: str = "5,5,5",
        adapter_inner_dim: int = 512,
        pad_audio_to_30s: bool = True,
        speech_positions: str = "all",
        prompt_format: str = "original",
        token_score: str = "dot",
        **kwargs,
    ):
        # The original release's config.json has no ``pad_audio_to_30s``: its checkpoints were
        # trained on 30 s of padding, so a config without the key means padding (ours always write it).
        super().__init__(**kwargs)
        self.whisper_config = dict(whisper_config or {})
        self.llama_config = dict(llama_config or {})
        self.conv_kernel_sizes = conv_kernel_sizes
        self.adapter_inner_dim = adapter_inner_dim
        self.pad_audio_to_30s = pad_audio_to_30s
        # "all": every adapter output position goes to the LM (the original); "ctc_tokens": only
        # those where the adapter's greedy CTC reading emits a token (BlspModel.select_speech_positions).
        if speech_positions not in SPEECH_POSITIONS:
            raise ValueError(f"speech_positions must be one of {SPEECH_POSITIONS}, got {speech_positions!r}")
        self.speech_positions = speech_positions
        # How the LM is prompted (blsp_ray.model.prompts); the original release's checkpoints: "original".
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        # How a position is scored against a token (``token_scores``): "dot" for checkpoints that record nothing.
        if token_score not in TOKEN_SCORES:
            raise ValueError(f"token_score must be one of {TOKEN_SCORES}, got {token_score!r}")
        self.token_score = token_score

    def to_diff_dict(self) -> dict:
        return {**super().to_diff_dict(), "pad_audio_to_30s": self.pad_audio_to_30s}

    @property
    def whisper(self) -> WhisperConfig:
        return WhisperConfig(**self.whisper_config)

    @property
    def llama(self) -> LlamaConfig:
        return LlamaConfig(**self.llama_config)

    @property
    def kernel_sizes(self) -> list[int]:
        return [int(k) for k in self.conv_kernel_sizes.split(",")]


def conv_output_lengths(lengths: torch.Tensor, num_layers: int = 1) -> torch.Tensor:
    """Length after ``num_layers`` stride-2 convs with padding k//2: floor((L - 1) / 2 + 1) each."""
    for _ in range(num_layers):
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


def subsampling_factor(num_conv_layers: int) -> int:
    """Mel frames per speech embedding: Whisper's conv2 halves, each subsampler layer halves."""
    return 2 ** (1 + num_conv_layers)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on real positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class Conv1dSubsampler(nn.Module):
    """Stride-2 convolutions over time, each followed by GLU over channels (from fairseq's S2T)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_sizes: list[int]):
        super().__init__()
        n = len(kernel_sizes)
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(
                in_channels if i == 0 else mid_channels // 2,
                mid_channels if i < n - 1 else out_channels * 2,  # GLU halves the channels
                k,
                stride=2,
                padding=k // 2,
            )
            for i, k in enumerate(kernel_sizes)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, C_in] -> [B, T / 2^n, C_out]
        x = x.transpose(1, 2)  # [B, C, T]
        for conv in self.conv_layers:
            # Zero the batch padding so a clip's output does not depend on its batch neighbours
            # (a conv reads k//2 frames past the end, which must look like the conv's own zero pad).
            x = x * length_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
            x = F.glu(conv(x), dim=1)
            lengths = conv_output_lengths(lengths)
        x = x * length_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
        return x.transpose(1, 2), lengths


class Adapter(nn.Module):
    """Residual bottleneck: x + fc2(GELU(fc1(x))), no biases."""

    def __init__(self, hidden_size: int, inner_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_dim, bias=False)
        self.fc2 = nn.Linear(inner_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class SpeechAdapter(nn.Module):
    """The trainable part of BLSP: Whisper states [B, T, d_whisper] -> LM-space embeddings [B, S, H].

    Conv subsampler (S = T / 2^n) -> residual bottleneck adapter -> LayerNorm. Its state-dict keys
    (``subsampler.``, ``adapter.``, ``speech_ln.``) are those of the same weights in ``BlspModel``,
    so an adapter-only checkpoint is this module's state dict.
    """

    def __init__(self, subsampler: Conv1dSubsampler, adapter: Adapter, speech_ln: nn.LayerNorm):
        super().__init__()
        self.subsampler = subsampler
        self.adapter = adapter
        self.speech_ln = speech_ln

    @classmethod
    def create(cls, whisper_dim: int, hidden_size: int, kernel_sizes: list[int], inner_dim: int) -> SpeechAdapter:
        """A freshly initialised adapter (PyTorch's default init)."""
        return cls(
            Conv1dSubsampler(whisper_dim, 2 * whisper_dim, hidden_size, kernel_sizes),
            Adapter(hidden_size, inner_dim),
            nn.LayerNorm(hidden_size, eps=1e-5),
        )

    @property
    def subsampling_factor(self) -> int:
        return subsampling_factor(len(self.subsampler.conv_layers))

    @torch.no_grad()
    def match_embedding_scale(self, lm: LlamaForCausalLM) -> None:
        """Start the final LayerNorm's gain at the RMS of the LM's input embeddings, so speech enters
        the LM at the scale of text (LayerNorm's default gain 1 puts it 7x above SmolLM2's token
        embeddings, 60x above Llama-2's), not an order above it."""
        self.speech_ln.weight.fill_(embedding_rms(lm))

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, d_whisper], lengths [B] -> embeds [B, S, H], lengths [B]."""
        x, lengths = self.subsampler(hidden, lengths)
        return self.speech_ln(self.adapter(x)), lengths


@dataclass
class SpeechBatch:
    """Whisper log-mel features of a batch and the number of real frames in each."""

    features: torch.Tensor  # [B, n_mels, F]
    frame_lengths: torch.Tensor  # [B], <= F

    def to(self, device) -> SpeechBatch:
        return SpeechBatch(self.features.to(device), self.frame_lengths.to(device))


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors (and ``SpeechBatch``) on ``device``; other values as they are."""
    return {k: v.to(device) if isinstance(v, (torch.Tensor, SpeechBatch)) else v for k, v in batch.items()}


def whisper_encode(enc: WhisperEncoder, speech: SpeechBatch, pad_audio_to_30s: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel features -> Whisper hidden states [B, T, d_model] and their lengths [B] (T = frames / 2).

    A function of the encoder alone, so stage 2 can run it once over its data (the encoder is
    frozen) as well as inside ``BlspModel``.
    """
    feats = speech.features.to(enc.conv1.weight.dtype)
    out_lengths = conv_output_lengths(speech.frame_lengths)  # conv2: stride 2
    if pad_audio_to_30s:
        # The original: the library encoder over all 30 s (padding included), then cut.
        hidden = enc(feats).last_hidden_state
        return hidden[:, : int(out_lengths.max())], out_lengths
    frames = feats.shape[-1]
    if frames > 2 * enc.config.max_source_positions:
        raise ValueError(f"speech has {frames} mel frames, more than Whisper's {2 * enc.config.max_source_positions}")
    frame_mask = length_mask(speech.frame_lengths, frames)[:, None, :].to(feats.dtype)
    x = F.gelu(enc.conv1(feats * frame_mask)) * frame_mask
    x = F.gelu(enc.conv2(x)).permute(0, 2, 1)  # [B, T, d_model]
    x = x + enc.embed_positions.weight[: x.shape[1]]
    keep = length_mask(out_lengths, x.shape[1])  # [B, T]
    attn_mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
    attn_mask = attn_mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]  # [B,1,1,T]
    for layer in enc.layers:
        x = layer(x, attn_mask)
    return enc.layer_norm(x), out_lengths


class BlspModel(PreTrainedModel):
    config_class = BlspConfig
    base_model_prefix = "blsp"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(
        self,
        config: BlspConfig,
        llama_model: LlamaForCausalLM | None = None,
        whisper_model: WhisperEncoder | None = None,
    ):
        super().__init__(config)
        self.whisper_model = whisper_model if whisper_model is not None else WhisperEncoder(config.whisper)
        self.llama_model = llama_model if llama_model is not None else LlamaForCausalLM(config.llama)
        fresh = self.fresh_speech_adapter()
        # Registered on the model itself, under the original release's state-dict names;
        # ``speech_adapter`` is the one module they make.
        self.subsampler, self.adapter, self.speech_ln = fresh.subsampler, fresh.adapter, fresh.speech_ln
        for given in (llama_model, whisper_model):  # loaded weights: post_init must not re-initialise them
            for module in given.modules() if given is not None else ():
                module._is_hf_initialized = True
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models initialise themselves; our own layers keep PyTorch's default init.
        pass

    # ---- parameters -----------------------------------------------------------------------

    def freeze_backbones(self) -> None:
        """Stage 2: only the subsampler, adapter and LayerNorm train."""
        for module in (self.whisper_model, self.llama_model):
            module.requires_grad_(False)
            module.eval()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The speech adapter's weights, under the same keys as in this model's state dict."""
        return self.speech_adapter.state_dict()

    # ---- speech -------------------------------------------------------------------------

    @property
    def speech_adapter(self) -> SpeechAdapter:
        """The trainable part as one module (what stage 2 hands DeepSpeed): a view that shares
        this model's ``subsampler``, ``adapter`` and ``speech_ln``, not a copy."""
        return SpeechAdapter(self.subsampler, self.adapter, self.speech_ln)

    def fresh_speech_adapter(self) -> SpeechAdapter:
        """A newly initialised adapter of this model's shape, on the LM's device and in its dtype."""
        adapter = SpeechAdapter.create(self.whisper_model.config.d_model, self.llama_model.config.hidden_size,
                                       self.config.kernel_sizes, self.config.adapter_inner_dim)
        return adapter.to(device=self.llama_model.device, dtype=self.llama_model.dtype)

    def encode_speech(self, speech: SpeechBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel features -> Whisper hidden states [B, T, d_model] and their lengths [B]."""
        return whisper_encode(self.whisper_model, speech, self.config.pad_audio_to_30s)

    def speech_embeddings(self, speech: SpeechBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel features -> LM-space speech embeddings [B, S, hidden] and lengths [B], the positions
        the LM reads (``select_speech_positions``)."""
        hidden, lengths = self.encode_speech(speech)
        return self.select_speech_positions(*self.speech_adapter(hidden, lengths))

    def select_speech_positions(self, embeds: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's output positions the LM reads: all of them, or with ``speech_positions:
        ctc_tokens`` those ``read_speech_tokens`` keeps. embeds [B, S, H] -> [B, S', H], lengths [B]."""
        if self.config.speech_positions == "all":
            return embeds, lengths
        return read_speech_tokens(embeds, lengths, self.llama_model.get_input_embeddings().weight, self.config.token_score)

    # ---- splicing ---------------------------------------------------------------------------

    def splice(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        speech_embeds: torch.Tensor | None,
        speech_lengths: torch.Tensor | None,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
        suffix_labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Build [prefix | speech | suffix] per example, padded at one side.

        prefix_ids [B, P], suffix_ids [B, Q] (right-padded, masks give real tokens),
        speech_embeds [B, S, H] with lengths [B]. Returns inputs_embeds [B, L, H],
        attention_mask [B, L] and labels [B, L] (-100 on prefix, speech, template and padding).
        """
        embed = self.llama_model.get_input_embeddings()
        prefix_emb, suffix_emb = embed(prefix_ids), embed(suffix_ids)
        rows, row_labels = [], []
        for i in range(prefix_ids.shape[0]):
            parts = [prefix_emb[i, prefix_mask[i].bool()]]
            if speech_embeds is not None:
                parts.append(speech_embeds[i, : int(speech_lengths[i])].to(prefix_emb.dtype))
            suffix_keep = suffix_mask[i].bool()
            parts.append(suffix_emb[i, suffix_keep])
            rows.append(torch.cat(parts))
            if suffix_labels is not None:
                n_ignored = sum(p.shape[0] for p in parts[:-1])
                ignored = suffix_labels.new_full((n_ignored,), -100)
                row_labels.append(torch.cat([ignored, suffix_labels[i, suffix_keep]]))
        max_len = max(r.shape[0] for r in rows)
        hidden = prefix_emb.shape[-1]
        inputs = prefix_emb.new_zeros(len(rows), max_len, hidden)
        attention = prefix_mask.new_zeros(len(rows), max_len)
        labels = suffix_labels.new_full((len(rows), max_len), -100) if suffix_labels is not None else None
        for i, r in enumerate(rows):
            n = r.shape[0]
            span = slice(0, n) if padding_side == "right" else slice(max_len - n, max_len)
            inputs[i, span] = r
            attention[i, span] = 1
            if labels is not None:
                labels[i, span] = row_labels[i]
        return inputs, attention, labels

    def forward(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
        suffix_labels: torch.Tensor | None = None,
        speech: SpeechBatch | None = None,
        speech_embeds: torch.Tensor | None = None,
        speech_lengths: torch.Tensor | None = None,
        **lm_kwargs,
    ) -> CausalLMOutputWithPast:
        """Loss (when ``suffix_labels`` is given) covers only the target tokens of the suffix.

        Speech comes as mel features (``speech``) or as precomputed adapter output
        (``speech_embeds`` + ``speech_lengths``); neither gives the plain text LM.
        """
        if speech is not None:
            speech_embeds, speech_lengths = self.speech_embeddings(speech)
        inputs_embeds, attention_mask, labels = self.splice(
            prefix_ids, prefix_mask, speech_embeds, speech_lengths, suffix_ids, suffix_mask, suffix_labels
        )
        return self.llama_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    @torch.no_grad()
    def generate(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
        speech: SpeechBatch | None = None,
        speech_embeds: torch.Tensor | None = None,
        speech_lengths: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy/sampled generation through the LM from spliced embeddings; returns new tokens only.

        Speech as in ``forward``: mel features, or embeddings already in LM space (adapter output).
        """
        if speech is not None:
            speech_embeds, speech_lengths = self.speech_embeddings(speech)
        inputs_embeds, attention_mask, _ = self.splice(
            prefix_ids, prefix_mask, speech_embeds, speech_lengths, suffix_ids, suffix_mask, padding_side="left"
        )
        return self.llama_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    # ---- checkpoints --------------------------------------------------------------------------

    def save_adapter(self, directory: str | os.PathLike, lm_path: str, whisper_path: str) -> None:
        """Adapter-only checkpoint (stage 2): the trained weights plus pointers to the frozen bases."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}, directory / ADAPTER_WEIGHTS)
        meta = {
            "lm_path": str(lm_path),
            "whisper_path": str(whisper_path),
            "conv_kernel_sizes": self.config.conv_kernel_sizes,
            "adapter_inner_dim": self.config.adapter_inner_dim,
            "pad_audio_to_30s": self.config.pad_audio_to_30s,
            "speech_positions": self.config.speech_positions,
            "prompt_format": self.config.prompt_format,
            "token_score": self.config.token_score,
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """The adapter weights of a ``save_adapter`` checkpoint, into this model (strict: every key fits)."""
        path = Path(directory) / ADAPTER_WEIGHTS
        try:
            self.speech_adapter.load_state_dict(load_file(path))
        except RuntimeError as err:
            raise ValueError(f"{directory}: adapter checkpoint does not fit: {err}") from None


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory (safetensors shards or pytorch_model.bin)."""
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(shard))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for b in bins:
        state.update(torch.load(b, map_location="cpu", weights_only=True))
    return state


def bf16_is_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 or AMX (Linux's CPU flags). Elsewhere bfloat16 matmuls are emulated through
    float32 and run several times slower than float32 itself."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def frozen_dtype(setting: str | None, trained: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a frozen module's weights are held and run in: ``setting`` (``float32``,
    ``bfloat16``), ``auto`` (bfloat16 where ``bf16_is_native(device)``, else ``trained``), or None
    (``trained``, the dtype the trainable part runs at)."""
    if setting is None or (setting == "auto" and not bf16_is_native(device)):
        return trained
    return torch.bfloat16 if setting == "auto" else getattr(torch, setting)


def load_whisper_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """The encoder of any Whisper checkpoint: WhisperForConditionalGeneration, WhisperModel or encoder-only."""
    path = Path(path)
    config = WhisperConfig.from_pretrained(path)
    state = _read_state_dict(path)
    enc_state = {}
    for k, v in state.items():
        if "encoder." in k:
            enc_state[k.split("encoder.", 1)[1]] = v
        elif not k.startswith(("decoder.", "model.decoder.", "proj_out.")):
            enc_state[k] = v  # already an encoder-only checkpoint
    encoder = WhisperEncoder(config)
    missing, unexpected = encoder.load_state_dict(enc_state, strict=False)
    missing = [m for m in missing if m != "embed_positions.weight" or "embed_positions.weight" not in enc_state]
    if missing:
        raise ValueError(f"{path}: Whisper encoder weights missing: {missing[:5]}")
    return encoder.to(dtype)


def build_blsp_from_parts(
    lm_path: str | os.PathLike,
    whisper_path: str | os.PathLike,
    conv_kernel_sizes: str = "5,5,5",
    adapter_inner_dim: int = 512,
    pad_audio_to_30s: bool = False,
    dtype: torch.dtype = torch.float32,
    match_embedding_scale: bool = False,
    speech_positions: str = "all",
    prompt_format: str = "original",
    token_score: str = "dot",
) -> BlspModel:
    """A BLSP model from a causal-LM checkpoint and a Whisper checkpoint, with a fresh adapter
    (``match_embedding_scale``: see ``SpeechAdapter.match_embedding_scale``)."""
    llama = LlamaForCausalLM.from_pretrained(lm_path, dtype=dtype)
    whisper = load_whisper_encoder(whisper_path, dtype)
    config = BlspConfig(
        whisper_config=whisper.config.to_dict(),
        llama_config=llama.config.to_dict(),
        conv_kernel_sizes=conv_kernel_sizes,
        adapter_inner_dim=adapter_inner_dim,
        pad_audio_to_30s=pad_audio_to_30s,
        speech_positions=speech_positions,
        prompt_format=prompt_format,
        token_score=token_score,
    )
    model = BlspModel(config, llama_model=llama, whisper_model=whisper)
    if match_embedding_scale:
        model.speech_adapter.match_embedding_scale(llama)
    return model.to(dtype)


def embedding_rms(lm: LlamaForCausalLM) -> float:
    """Root mean square of the LM's input token embeddings: the scale text enters the LM at."""
    return float(lm.get_input_embeddings().weight.float().pow(2).mean().sqrt())


def adapter_metadata(path: str | os.PathLike) -> dict | None:
    """The ``blsp_adapter.json`` of an adapter-only checkpoint (bases, adapter shape, audio
    settings); None for a full checkpoint. The one reader of that file."""
    meta_file = Path(path) / ADAPTER_CONFIG
    return json.loads(meta_file.read_text()) if meta_file.exists() else None


def checkpoint_bases(path: str | os.PathLike) -> tuple[str, str]:
    """(LM dir, Whisper dir) holding the tokenizer and feature extractor of a BLSP checkpoint."""
    meta = adapter_metadata(path)
    if meta is not None:
        return meta["lm_path"], meta["whisper_path"]
    return str(path), str(path)  # a full checkpoint carries both


def checkpoint_pads_audio(path: str | os.PathLike, override: bool | None = None) -> bool:
    """Whether the checkpoint's Whisper input is padded to 30 s: ``override`` if given, else what the
    checkpoint records (an original-release config, which records nothing, means padding). The
    model ``load_blsp(path, pad_audio_to_30s=override)`` loads runs with the same value, so feature
    extraction elsewhere (decode tasks) reads it here."""
    if override is not None:
        return override
    meta = adapter_metadata(path)
    if meta is not None:
        return bool(meta.get("pad_audio_to_30s", False))
    return bool(BlspConfig.from_pretrained(path).pad_audio_to_30s)


def load_blsp(path: str | os.PathLike, dtype: torch.dtype = torch.float32, pad_audio_to_30s: bool | None = None) -> BlspModel:
    """Load an adapter-only checkpoint (``blsp_adapter.json``) or a full BLSP checkpoint.

    A full checkpoint may be ours (``save_pretrained``) or the original release's layout: the
    key names are the same, and a config without ``pad_audio_to_30s`` loads with the 30 s padding
    the original trained with. ``pad_audio_to_30s`` overrides what the checkpoint recorded.
    """
    path = Path(path)
    meta = adapter_metadata(path)
    if meta is not None:
        if pad_audio_to_30s is not None:
            meta["pad_audio_to_30s"] = pad_audio_to_30s
        model = build_blsp_from_parts(**meta, dtype=dtype)
        model.load_adapter(path)
        return model
    kwargs = {} if pad_audio_to_30s is None else {"pad_audio_to_30s": pad_audio_to_30s}
    return BlspModel.from_pretrained(path, dtype=dtype, **kwargs)


def blsp_config_for(settings) -> BlspConfig:
    """A BlspConfig from our ``ModelConfig``: the checkpoints' configs, or the given architectures."""
    llama = settings.lm_architecture
    if llama is None:
        llama = LlamaConfig.from_pretrained(settings.lm_path).to_dict()
    whisper = settings.whisper_architecture
    if whisper is None:
        whisper = WhisperConfig.from_pretrained(settings.whisper_path).to_dict()
    return BlspConfig(
        whisper_config=whisper,
        llama_config=llama,
        conv_kernel_sizes=settings.conv_kernel_sizes,
        adapter_inner_dim=settings.adapter_inner_dim,
        pad_audio_to_30s=settings.pad_audio_to_30s,
        speech_positions=settings.speech_positions,
        prompt_format=settings.prompt_format,
        token_score=settings.token_score,
    )


def build_blsp(settings) -> BlspModel:
    """The model a stage starts from: the LM and Whisper checkpoints of ``settings`` and a fresh adapter."""
    return build_blsp_from_parts(
        settings.lm_path,
        settings.whisper_path,
        settings.conv_kernel_sizes,
        settings.adapter_inner_dim,
        settings.pad_audio_to_30s,
        dtype=getattr(torch, settings.dtype),
        match_embedding_scale=settings.match_embedding_scale,
        speech_positions=settings.speech_positions,
        prompt_format=settings.prompt_format,
        token_score=settings.token_score,
    )
