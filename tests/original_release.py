"""The original release, as far as parity tests need it: a checkpoint in its layout and its forward,
written from the facts of its code (../shared/seed/FACTS.md), not from ours.

* ``write_original_checkpoint``: a tiny random BLSP checkpoint with the original's key names and
  config fields (no ``pad_audio_to_30s``), weights in ``pytorch_model.bin``, tokenizer beside it.
* ``original_frames``: the real mel-frame count the original takes (the feature extractor's
  sample-level attention mask over the 30 s input, every 160th entry).
* ``original_logits`` / ``original_greedy``: its forward for one clip: the library Whisper encoder
  over all 30 s, cut to the real length, conv+GLU layers (no masking), the residual bottleneck
  adapter, LayerNorm, then [prefix | speech | suffix] into the LM.
* ``original_prompt_ids``: its prompt ids: ``tokenizer("###[Human]:" + instruction)`` and
  ``tokenizer("\\n\\n\\n###[Assistant]:").input_ids[1:]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from blsp_ray.model.modeling import load_whisper_encoder

KERNELS = [5, 5, 5]
INNER = 48


def write_original_checkpoint(lm_dir: Path, whisper_dir: Path, out: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A full checkpoint as the original release writes it; returns its state dict."""
    torch.manual_seed(seed)
    lm = LlamaForCausalLM.from_pretrained(lm_dir)
    whisper = load_whisper_encoder(whisper_dir)
    d, hidden = whisper.config.d_model, lm.config.hidden_size
    state = {f"whisper_model.{k}": v for k, v in whisper.state_dict().items()}
    state.update({f"llama_model.{k}": v for k, v in lm.state_dict().items()})
    for i, k in enumerate(KERNELS):
        c_out = 2 * d if i < len(KERNELS) - 1 else 2 * hidden  # GLU halves 2 x d_model back to d_model
        state[f"subsampler.conv_layers.{i}.weight"] = torch.randn(c_out, d, k) * 0.05
        state[f"subsampler.conv_layers.{i}.bias"] = torch.randn(c_out) * 0.05
    state["adapter.fc1.weight"] = torch.randn(INNER, hidden) * 0.05
    state["adapter.fc2.weight"] = torch.randn(hidden, INNER) * 0.05
    state["speech_ln.weight"] = 1 + 0.1 * torch.randn(hidden)
    state["speech_ln.bias"] = 0.1 * torch.randn(hidden)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["BlspModel"], "model_type": "blsp",
        "whisper_config": whisper.config.to_dict(), "llama_config": lm.config.to_dict(),
        "conv_kernel_sizes": ",".join(map(str, KERNELS)), "adapter_inner_dim": INNER,
    }))
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(out)
    WhisperFeatureExtractor.from_pretrained(whisper_dir).save_pretrained(out)
    return state


def original_features(extractor: WhisperFeatureExtractor, wav: np.ndarray) -> tuple[torch.Tensor, int]:
    """30 s log-mel [1, n_mels, 3000] and the real frame count, as the original computes them."""
    out = extractor(wav, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    return out["input_features"], int(out["attention_mask"].sum())


def original_prompt_ids(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    return tokenizer("###[Human]:" + instruction).input_ids, tokenizer("\n\n\n###[Assistant]:").input_ids[1:]


class OriginalForward:
    """The original's forward for one clip, over a checkpoint's state dict."""

    def __init__(self, state: dict[str, torch.Tensor], whisper_config, lm: LlamaForCausalLM):
        self.state, self.lm = state, lm.eval()
        self.encoder = WhisperEncoder(whisper_config).eval()
        self.encoder.load_state_dict({k[len("whisper_model."):]: v for k, v in state.items() if k.startswith("whisper_model.")})

    @torch.no_grad()
    def speech(self, feats_30s: torch.Tensor, n_frames: int) -> torch.Tensor:
        """[1, n_mels, 3000] + real frames -> speech embeddings [1, S, hidden]."""
        s = self.state
        h = self.encoder(feats_30s).last_hidden_state  # [1, 1500, d]
        x = h[:, : (n_frames - 1) // 2 + 1].transpose(1, 2)  # [1, d, T]
        for i, k in enumerate(KERNELS):
            x = F.glu(F.conv1d(x, s[f"subsampler.conv_layers.{i}.weight"], s[f"subsampler.conv_layers.{i}.bias"],
                               stride=2, padding=k // 2), dim=1)
        x = x.transpose(1, 2)
        x = x + F.linear(F.gelu(F.linear(x, s["adapter.fc1.weight"])), s["adapter.fc2.weight"])
        return F.layer_norm(x, (x.shape[-1],), s["speech_ln.weight"], s["speech_ln.bias"], eps=1e-5)

    @torch.no_grad()
    def logits(self, prefix_ids: list[int], speech: torch.Tensor, suffix_ids: list[int]) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()
        inputs = torch.cat([emb(torch.tensor([prefix_ids])), speech, emb(torch.tensor([suffix_ids]))], dim=1)
        return self.lm(inputs_embeds=inputs).logits[0]  # [L, V]

    @torch.no_grad()
    def greedy(self, prefix_ids: list[int], speech: torch.Tensor, suffix_ids: list[int], max_new_tokens: int,
               eos_id: int) -> list[int]:
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(prefix_ids, speech, suffix_ids + out)[-1].argmax())
            if nxt == eos_id:
                break
            out.append(nxt)
        return out
