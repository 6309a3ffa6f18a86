"""Small random-weight models built offline (no hub): a Llama-style LM + tokenizer and a Whisper encoder.

Tests and the random-weight demo use these. The layout is the ordinary Hugging Face one, so the
same loading code reads them and real checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from blsp_ray.config import TinyAssetsConfig
from blsp_ray.demo.corpus import make_instructions, make_sentences
from blsp_ray.model.prompts import CONTINUATION_INSTRUCTION, OriginalPrompts
from blsp_ray.io.storage import atomic_dir

log = logging.getLogger(__name__)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; adds BOS like Llama's tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _tokenizer_texts(seed: int) -> list[str]:
    sentences = make_sentences(1500, seed)
    prompts = [OriginalPrompts().text_prompt(f"{CONTINUATION_INSTRUCTION} {s}") for s in sentences[:200]]
    instr = [f"{r['instruction']} {r['input']} {r['output']}" for r in make_instructions(300, seed)]
    return sentences + prompts + instr


def build_tiny_assets(cfg: TinyAssetsConfig) -> Path:
    """Write ``<out_dir>/lm`` and ``<out_dir>/whisper``; a rerun with the same settings does nothing."""
    out = Path(cfg.out_dir)
    stamp = out / "assets.json"
    settings = cfg.model_dump()
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        log.info("tiny assets up to date in %s", out)
        return out
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(_tokenizer_texts(cfg.seed), cfg.vocab_size)
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.lm_hidden_size,
        intermediate_size=cfg.lm_intermediate_size,
        num_hidden_layers=cfg.lm_layers,
        num_attention_heads=cfg.lm_heads,
        num_key_value_heads=cfg.lm_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with atomic_dir(out / "lm") as tmp:
        LlamaForCausalLM(lm_config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    whisper_config = WhisperConfig(
        num_mel_bins=cfg.whisper_mel_bins,
        d_model=cfg.whisper_d_model,
        encoder_layers=cfg.whisper_layers,
        encoder_attention_heads=cfg.whisper_heads,
        encoder_ffn_dim=4 * cfg.whisper_d_model,
        decoder_layers=1,
        decoder_attention_heads=cfg.whisper_heads,
        decoder_ffn_dim=4 * cfg.whisper_d_model,
        max_source_positions=1500,
    )
    with atomic_dir(out / "whisper") as tmp:
        WhisperEncoder(whisper_config).save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=cfg.whisper_mel_bins).save_pretrained(tmp)
    stamp.write_text(json.dumps(settings, indent=2))
    log.info("built tiny assets in %s (vocab %d)", out, len(tokenizer))
    return out
