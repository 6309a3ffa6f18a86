"""Stage-2 training samples/s: our step against a step faithful to the original BLSP, same model and batch.

Ours: Whisper reads each clip at its real length (padding masked), under no_grad (frozen), and
the trainer's ``stage2_objective`` projects to the vocabulary only where a continuation token
is predicted. Original: every clip padded to 30 s and the encoder run over all of it, every
step, and the LM's loss over full-sequence logits (``BlspModel.forward``). Both run the adapter,
the frozen LM over [prefix | speech | suffix], backward into the adapter and an AdamW step. Single
process (the per-worker step); prints both rates and their ratio, plus the two losses after
the same number of steps on the same data (what is learned should match). A third run is ours
with ``stage2.cache_encoder_outputs``: the encoder ran once before training, steps reuse it. A
fourth is that with the frozen LM in ``stage2.frozen_lm_dtype`` as the config resolves it on this
machine (bfloat16 where the CPU multiplies it in hardware), when that is not float32: the step as
configured.

    python benchmarks/stage2_step.py [--config configs/tiny.yaml] [--batch 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from blsp_ray.demo.assets import build_tiny_assets
from blsp_ray.model.audio import load_audio
from blsp_ray.config import TinyAssetsConfig, load_config
from blsp_ray.demo.corpus import make_sentences
from blsp_ray.model.modeling import bf16_is_native, build_blsp, frozen_dtype
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.demo.speech import speak_wav
from blsp_ray.model.losses import stage2_objective

REPO = Path(__file__).resolve().parents[1]
PROMPT_KEYS = ("prefix_ids", "prefix_mask", "suffix_ids", "suffix_mask", "suffix_labels")


def make_batch(processor: BlspProcessor, n: int, workdir: Path, instruction: str):
    texts = make_sentences(n, seed=7)
    wavs = []
    for i, text in enumerate(texts):
        path = workdir / f"clip{i}.wav"
        if not path.exists():
            speak_wav(text, "en-us", 160, 50, path)
        wavs.append(load_audio(str(path)))
    examples = [processor.speech_prompt(instruction, t) for t in texts]
    return examples, wavs


def run(settings, pad_to_30s: bool, examples, wavs, steps: int, lr: float, cached: bool = False,
        lm_dtype: torch.dtype = torch.float32) -> tuple[float, float, float]:
    """samples/s over ``steps`` timed steps, the loss of the first step (the same initial weights in
    every run) and of the last."""
    torch.manual_seed(0)
    model = build_blsp(settings.model_copy(update={"pad_audio_to_30s": pad_to_30s}))
    model.freeze_backbones()
    model.llama_model.to(lm_dtype)  # as Stage2Task.build does with stage2.frozen_lm_dtype
    processor = BlspProcessor.from_paths(settings.lm_path, settings.whisper_path, pad_audio_to_30s=pad_to_30s)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    encoded = None
    if cached:  # stage2.cache_encoder_outputs: Whisper ran once, before training (a Ray Data step)
        with torch.no_grad():
            encoded = model.encode_speech(processor.features(wavs))

    def step() -> float:
        if encoded is not None:
            batch = processor.collate_speech(examples)
            hidden, lengths = encoded
        else:
            batch = processor.collate_speech(examples, wavs)  # feature extraction is part of the step
            with torch.no_grad():
                hidden, lengths = model.encode_speech(batch["speech"])
        embeds, lengths = model.speech_adapter(hidden, lengths)
        if pad_to_30s:  # the original's loss: logits over the whole sequence
            loss = model(**{k: batch[k] for k in PROMPT_KEYS}, speech_embeds=embeds, speech_lengths=lengths).loss
        else:  # ours: the trainer's objective (logits only at the continuation)
            loss = stage2_objective(model, batch, embeds, lengths)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()  # warm-up, untimed
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    return steps * len(examples) / elapsed, first, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a run config (its model section); default: tiny assets in a temp dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. model.lm_path=...")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="stage2-bench-"))
    if args.config:
        cfg = load_config(args.config, args.set)
        settings, lr, instruction = cfg.model, cfg.stage2.lr, cfg.stage2.instruction
    else:
        assets = build_tiny_assets(TinyAssetsConfig(out_dir=str(workdir / "assets")))
        cfg = load_config(REPO / "configs" / "tiny.yaml")
        settings = cfg.model.model_copy(update={"lm_path": str(assets / "lm"), "whisper_path": str(assets / "whisper")})
        lr, instruction = cfg.stage2.lr, cfg.stage2.instruction
    processor = BlspProcessor.from_paths(settings.lm_path, settings.whisper_path)
    examples, wavs = make_batch(processor, args.batch, workdir, instruction)
    seconds = [len(w) / 16000 for w in wavs]
    print(f"batch: {len(wavs)} clips, {np.mean(seconds):.2f} s mean ({min(seconds):.2f}-{max(seconds):.2f} s); "
          f"{args.steps} timed steps each; torch threads {torch.get_num_threads()}")
    original, first_original, loss_original = run(settings, True, examples, wavs, args.steps, lr)
    ours, first_ours, loss_ours = run(settings, False, examples, wavs, args.steps, lr)
    cached, first_cached, loss_cached = run(settings, False, examples, wavs, args.steps, lr, cached=True)
    lm_dtype = frozen_dtype(cfg.stage2.frozen_lm_dtype, torch.float32)
    configured, first_configured, loss_configured = cached, first_cached, loss_cached
    if lm_dtype != torch.float32:
        configured, first_configured, loss_configured = run(settings, False, examples, wavs, args.steps, lr, cached=True, lm_dtype=lm_dtype)
    lm_dtype_name = str(lm_dtype).removeprefix("torch.")
    print(f"original (30 s padding, encoder every step): {original:8.2f} samples/s   loss after {args.steps + 1} steps {loss_original:.4f}")
    print(f"ours (real-length, masked encoder):          {ours:8.2f} samples/s   loss after {args.steps + 1} steps {loss_ours:.4f}")
    print(f"ours + cached encoder outputs:               {cached:8.2f} samples/s   loss after {args.steps + 1} steps {loss_cached:.4f}")
    print(f"ours as configured (cached, frozen LM in {lm_dtype_name:<8}): {configured:8.2f} samples/s   loss after {args.steps + 1} steps "
          f"{loss_configured:.4f}   (stage2.frozen_lm_dtype {cfg.stage2.frozen_lm_dtype}; bf16 in hardware here: {bf16_is_native('cpu')})")
    print(f"first step's loss (same initial weights): original {first_original:.4f}, ours {first_ours:.4f}, "
          f"ours cached {first_cached:.4f}, as configured {first_configured:.4f}")
    print(f"speed-up: {ours / original:.2f}x (real-length), {cached / original:.2f}x (+ cached encoder outputs), "
          f"{configured / original:.2f}x (as configured)")
    print(json.dumps({"samples_per_s": {"original": original, "ours": ours, "ours_cached": cached, "ours_configured": configured},
                      "loss": {"original": loss_original, "ours": loss_ours, "ours_cached": loss_cached,
                               "ours_configured": loss_configured},
                      "first_loss": {"original": first_original, "ours": first_ours, "ours_cached": first_cached,
                                     "ours_configured": first_configured},
                      "frozen_lm_dtype": lm_dtype_name, "steps": args.steps, "batch": len(wavs)}))


if __name__ == "__main__":
    main()
