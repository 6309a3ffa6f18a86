"""Export any BLSP checkpoint (adapter-only, full, or the original release's layout) as one
directory that vLLM loads as the native ``BlspForConditionalGeneration`` (``vllm_blsp.py``);
``blsp-ray export-vllm`` writes one, and ``SpeechLM`` makes one per checkpoint for its vLLM engine:

* ``config.json``: the ``BlspConfig`` with ``architectures: [BlspForConditionalGeneration]`` and
  the speech token's id; ``model.safetensors``: the whole ``BlspModel`` (LM, Whisper encoder,
  adapter) under its own names, so ``load_blsp`` loads the export too;
* the LM's tokenizer plus ``SPEECH_TOKEN``, a special token (never merged with its neighbours) that
  marks where a clip goes, and a chat template that lays a conversation out as the checkpoint's
  prompt format does (``prompts.py``), with the speech after each turn's text;
* Whisper's feature extractor (``preprocessor_config.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from blsp_ray.model.modeling import checkpoint_bases, load_blsp
from blsp_ray.model.prompts import ASSISTANT, CHAT_TURN_END, HUMAN

ARCHITECTURE = "BlspForConditionalGeneration"
SPEECH_TOKEN = "<|speech|>"

# Message content as vLLM's OpenAI chat hands it (a list of parts) becomes one string, the parts
# in the order given, each audio part SPEECH_TOKEN: an instruction followed by its audio then reads
# "instruction<speech>", as in training (vLLM's own joining would put the audio first).
PARTS_IN_ORDER = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- else -%}{%- set ns.text = ns.text + '" + SPEECH_TOKEN + "' -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': ns.text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)

# The original layout (``OriginalPrompts.chat_turn_parts``): a system message is the header; each
# user turn is HUMAN + its text (speech included) + ASSISTANT; each past reply ends with CHAT_TURN_END.
ORIGINAL_LAYOUT = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '" + HUMAN + "' + message['content'] + " + json.dumps(ASSISTANT) + " }}"
    "{%- else -%}{{ message['content'] + " + json.dumps(CHAT_TURN_END) + " }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def chat_template(tokenizer, prompt_format: str) -> str:
    """The export's chat template: the checkpoint's prompt format over vLLM's chat messages. The
    prompt's BOS is the template's (vLLM does not add special tokens to a rendered chat), so it
    opens with one where the tokenizer adds it to text."""
    if prompt_format == "original":
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        return PARTS_IN_ORDER + ("{{- bos_token -}}" if adds_bos else "") + ORIGINAL_LAYOUT
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt_format lm_chat_template, but the LM's tokenizer at {tokenizer.name_or_path!r} has no chat template")
    return PARTS_IN_ORDER + tokenizer.chat_template


def export_for_vllm(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                    pad_audio_to_30s: bool | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``checkpoint`` into ``out_dir`` (made if missing) as a directory vLLM loads as BLSP,
    like ``save_pretrained``: a caller that needs it whole or absent writes a temp dir and renames
    it (``storage.cache_dir``). ``pad_audio_to_30s`` overrides what the checkpoint records, as in
    ``load_blsp``."""
    out_dir = Path(out_dir)
    model = load_blsp(checkpoint, dtype=dtype, pad_audio_to_30s=pad_audio_to_30s)
    lm_path, whisper_path = checkpoint_bases(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    tokenizer.add_tokens([SPEECH_TOKEN], special_tokens=True)
    tokenizer.chat_template = chat_template(tokenizer, model.config.prompt_format)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor.from_pretrained(whisper_path).save_pretrained(out_dir)
    # save_pretrained names the transformers class; vLLM picks its model by this.
    config = json.loads((out_dir / "config.json").read_text())
    config.update(architectures=[ARCHITECTURE], speech_token_id=tokenizer.convert_tokens_to_ids(SPEECH_TOKEN))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
