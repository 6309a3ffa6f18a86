"""Stage 2: only the speech adapter trains (Whisper encoder and LM frozen); the loop is ``blsp_ray.train``'s.

A task is built on the driver (datasets) and again inside each Ray Train worker (model, loss,
export) from the same config, so nothing heavy is pickled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import ray.data
import torch
from transformers import WhisperFeatureExtractor

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import BlspRayConfig
from blsp_ray.engines import TransformersEngine
from blsp_ray.heldout import HeldoutSet, labelling_settings
from blsp_ray.io.layout import RunLayout
from blsp_ray.io.storage import exists, is_s3, local_copy, read_jsonl
from blsp_ray.model.losses import ctc_alignment, stage2_objective
from blsp_ray.model.modeling import (
    SpeechAdapter,
    build_blsp,
    frozen_dtype,
    load_whisper_encoder,
    subsampling_factor,
    whisper_encode,
)
from blsp_ray.model.processing import (
    HOP_LENGTH,
    IGNORE,
    BlspProcessor,
    as_ids,
    load_tokenizer,
    log_mel,
    pad_ids,
    transcript_token_ids,
)
from blsp_ray.runtime import init_ray
from blsp_ray.speech_lm import SpeechLM
from blsp_ray.train.loop import Phase, TrainResult, run_training

# DeepSpeed is imported inside the worker-side methods only: importing it picks the accelerator,
# which must happen in the Ray Train worker after train.loop has set DS_ACCELERATOR.

log = logging.getLogger(__name__)
FROZEN_DIGEST = "frozen_weights.sha256.json"  # in the stage-2 export


# lm_path may be an S3 run's stage-1 URI: loaded from this node's local copy (endpoint: AWS_ENDPOINT_URL).
@functools.lru_cache(maxsize=4)
def _processor(lm_path: str, whisper_path: str, pad_audio_to_30s: bool = False, prompt_format: str = "original") -> BlspProcessor:
    return BlspProcessor.from_paths(local_copy(lm_path), whisper_path, pad_audio_to_30s, prompt_format)


def truncate_target(suffix_ids, suffix_labels, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the suffix template (unlabelled) and the first ``max_tokens`` labelled target tokens."""
    labels = np.asarray(suffix_labels)
    template = int(np.argmax(labels != IGNORE)) if (labels != IGNORE).any() else len(labels)
    keep = template + max_tokens
    return np.asarray(suffix_ids)[:keep], labels[:keep]


def prepare_stage2(batch: dict, lm_path: str, with_transcripts: bool, frames_per_embedding: int,
                   continuation_tokens: int | None = None) -> dict:
    """Ray Data map over preprocessed shards: a length estimate for bucketing (+ transcript ids for
    KL), continuations (not transcriptions: those are learnt whole, up to the EOS that ends them)
    cut to ``continuation_tokens`` when set."""
    out = {k: batch[k] for k in ("waveform", "prefix_ids", "suffix_ids", "suffix_labels")}
    if continuation_tokens is not None:
        cut = [truncate_target(i, l, continuation_tokens) if task == "continuation" else (i, l)
               for i, l, task in zip(batch["suffix_ids"], batch["suffix_labels"], batch["task"])]
        out["suffix_ids"] = [ids for ids, _ in cut]
        out["suffix_labels"] = [labels for _, labels in cut]
    speech = np.asarray([len(w) // HOP_LENGTH // frames_per_embedding for w in batch["waveform"]], dtype=np.int64)
    out["length"] = speech + np.asarray([len(p) + len(s) for p, s in zip(batch["prefix_ids"], out["suffix_ids"])])
    if with_transcripts:
        tokenizer = load_tokenizer(local_copy(lm_path))
        out["transcript_ids"] = [np.asarray(transcript_token_ids(tokenizer, t), dtype=np.int64) for t in batch["text"]]
    return out


@functools.lru_cache(maxsize=2)
def _whisper(whisper_path: str, dtype: str):
    return load_whisper_encoder(whisper_path, getattr(torch, dtype)).eval(), WhisperFeatureExtractor.from_pretrained(whisper_path)


def encoder_outputs(batch: dict, whisper_path: str, pad_audio_to_30s: bool, dtype: str) -> dict:
    """Ray Data map: waveforms -> frozen Whisper hidden states, computed once for every epoch.

    ``stage2.cache_encoder_outputs``: the encoder is frozen, so its output for a clip never
    changes; the materialised dataset holds ``encoder_hidden`` ([T, d_model] per row) instead of
    the waveform, and training steps skip feature extraction and the encoder. For data that fits
    the object store (Ray spills the rest to disk), e.g. BLSP-mini; off for corpus-scale runs.
    A task, not an actor pool: idle actors would hold the CPUs the read tasks need.
    """
    encoder, feature_extractor = _whisper(whisper_path, dtype)  # once per Ray worker process
    waves = [np.asarray(w, dtype=np.float32) for w in batch["waveform"]]
    with torch.no_grad():
        hidden, lengths = whisper_encode(encoder, log_mel(feature_extractor, waves, pad_audio_to_30s), pad_audio_to_30s)  # [B, T, d], [B]
    out = {k: v for k, v in batch.items() if k != "waveform"}
    out["encoder_hidden"] = [hidden[i, :n].float().numpy() for i, n in enumerate(lengths.tolist())]
    return out


class Stage2Task:
    """Whisper encoder and LM frozen; only the adapter trains, on the continuation tokens."""

    name = "stage2"

    def __init__(self, cfg: BlspRayConfig):
        self.cfg = cfg
        self.layout = RunLayout.of(cfg)

    @property
    def train(self):
        return self.cfg.stage2

    @property
    def export_target(self) -> str:
        return self.layout.stage2_model

    @property
    def lm_path(self) -> str:
        """The stage-1 checkpoint when the run has one (path or s3:// URI), else the configured LM."""
        stage1 = self.layout.stage1_model
        if exists(f"{stage1}/config.json", self.cfg.cluster.s3):
            return stage1 if is_s3(stage1) else str(Path(stage1).resolve())
        return self.cfg.model.lm_path

    @property
    def needs_transcripts(self) -> bool:
        return self.train.objective in ("kl", "ce+kl") or self.uses_alignment

    @property
    def uses_alignment(self) -> bool:
        """As a warm-up, as an auxiliary loss during the objective, or both."""
        return self.train.alignment_steps > 0 or self.train.alignment_weight > 0

    @property
    def phases(self) -> list[Phase]:
        """The alignment warm-up (when configured), then the objective at ``objective_lr``."""
        t = self.train
        objective = {"ce": "CE", "kl": f"KL at T={t.kl_temperature:g}", "ce+kl": f"CE + KL at T={t.kl_temperature:g}"}[t.objective]
        objective += f" + {t.alignment_weight:g} × CTC alignment" if t.alignment_weight else ""
        warm_up = [Phase(0, 1.0, "adapter warm-up: CTC alignment")] if t.alignment_steps else []
        # Without a warm-up objective_lr is unset (the config refuses it), so the scale is 1.
        return warm_up + [Phase(t.alignment_steps, (t.objective_lr or t.lr) / t.lr, f"adapter: {objective}")]

    def dataset(self) -> tuple[ray.data.Dataset, int]:
        columns = ["waveform", "task", "prefix_ids", "suffix_ids", "suffix_labels"] + (["text"] if self.needs_transcripts else [])
        ds = ray.data.read_parquet(self.layout.preprocessed, columns=columns)
        rows = ds.count()  # from the parquet footers; both maps below keep every row
        frames_per_embedding = subsampling_factor(len(self.cfg.model.conv_kernel_sizes.split(",")))
        ds = ds.map_batches(
            prepare_stage2,
            fn_kwargs={"lm_path": self.lm_path, "with_transcripts": self.needs_transcripts,
                       "frames_per_embedding": frames_per_embedding,
                       "continuation_tokens": self.train.continuation_tokens},
            batch_format="numpy",
            batch_size=64,
        )
        if not self.train.cache_encoder_outputs:
            return ds, rows
        model, data = self.cfg.model, self.cfg.data
        # A shard file is one block, and one task encodes a block: small blocks share the CPUs evenly
        # (3 shards on 2 CPUs left one encoding alone for a third of the time).
        ds = ds.repartition(target_num_rows_per_block=64)
        ds = ds.map_batches(
            encoder_outputs,
            fn_kwargs={"whisper_path": model.whisper_path, "pad_audio_to_30s": model.pad_audio_to_30s, "dtype": model.dtype},
            batch_format="numpy",
            batch_size=16,
            num_cpus=data.cpus_per_worker,
        )
        return ds.materialize(), rows  # computed once here; every epoch reads the object store

    # -- worker side --

    def build(self, dtype: torch.dtype) -> SpeechAdapter:
        """The BLSP model on this worker's device; DeepSpeed gets its speech adapter (the same
        weights), so only those get optimiser state and gradients. The frozen encoder and LM stay
        plain modules on the task (under ZeRO-3 they are replicated, not partitioned)."""
        from deepspeed.accelerator import get_accelerator

        settings = self.cfg.model.model_copy(update={"lm_path": local_copy(self.lm_path, self.cfg.cluster.s3)})
        self.blsp = build_blsp(settings)
        self.blsp.freeze_backbones()
        device = get_accelerator().current_device_name()
        self.blsp.whisper_model.to(dtype)
        self.blsp.llama_model.to(frozen_dtype(self.train.frozen_lm_dtype, dtype, device))
        # DeepSpeed moves only the module it is given (the adapter); the frozen encoder and LM the
        # loss runs through go to the same device here.
        self.blsp.to(device)
        self.processor = _processor(self.lm_path, self.cfg.model.whisper_path, self.cfg.model.pad_audio_to_30s,
                                    self.cfg.model.prompt_format)
        return self.blsp.speech_adapter

    def collate(self, rows: list[dict]) -> dict:
        examples = [
            {"prefix_ids": as_ids(r["prefix_ids"]), "suffix_ids": as_ids(r["suffix_ids"]),
             "suffix_labels": as_ids(r["suffix_labels"])}
            for r in rows
        ]
        if "encoder_hidden" in rows[0]:  # cached encoder outputs (encoder_outputs)
            batch = self.processor.collate_speech(examples)
            hidden = [torch.as_tensor(np.asarray(r["encoder_hidden"], dtype=np.float32)) for r in rows]  # [T_i, d]
            batch["encoder_hidden"] = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)  # [B, T, d]
            batch["encoder_lengths"] = torch.tensor([h.shape[0] for h in hidden])
        else:
            batch = self.processor.collate_speech(examples, [np.asarray(r["waveform"], dtype=np.float32) for r in rows])
        if self.needs_transcripts:
            ids = [as_ids(r["transcript_ids"]) or [self.processor.pad_id] for r in rows]
            batch["transcript_ids"] = pad_ids(ids, self.processor.pad_id)
            batch["transcript_lengths"] = torch.tensor([len(i) for i in ids])
        return batch

    def loss(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        if "encoder_hidden" in batch:
            hidden, lengths = batch["encoder_hidden"], batch["encoder_lengths"]
        else:
            with torch.no_grad():  # frozen encoder: no graph through it
                hidden, lengths = self.blsp.encode_speech(batch["speech"])
        speech_embeds, speech_lengths = engine(hidden.to(next(engine.module.parameters()).dtype), lengths)
        t = self.train
        if engine.global_steps < t.alignment_steps:
            loss = self._alignment(batch, speech_embeds, speech_lengths)
            return {"loss": loss, "alignment": loss.detach()}
        parts = stage2_objective(self.blsp, batch, *self.blsp.select_speech_positions(speech_embeds, speech_lengths),
                                 t.objective, t.ce_weight, t.kl_weight, t.kl_temperature)
        if t.alignment_weight:
            parts["alignment"] = self._alignment(batch, speech_embeds, speech_lengths)
            parts["loss"] = parts["loss"] + t.alignment_weight * parts["alignment"]
        return parts

    def _alignment(self, batch: dict, speech_embeds: torch.Tensor, speech_lengths: torch.Tensor) -> torch.Tensor:
        return ctc_alignment(self.blsp, speech_embeds, speech_lengths, batch["transcript_ids"], batch["transcript_lengths"],
                             self.train.alignment_negatives)

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int(batch["prefix_mask"].sum() + batch["suffix_mask"].sum())

    def heldout_metrics(self, engine) -> dict[str, float]:
        """Rank 0, at reports: the adapter on ``stage2.eval_rows`` held-out clips (empty when off)."""
        if not self.train.eval_rows or engine.zero_optimization_stage() == 3:  # ZeRO-3 gathers are collective
            return {}
        if getattr(self, "_heldout", None) is None:
            rows = [r for r in read_jsonl(self.cfg.heldout_manifest()) if r.get("audio") and r.get("text")][: self.train.eval_rows]
            text_engine = TransformersEngine(self.blsp.llama_model, self.processor.tokenizer, labelling_settings(self.cfg), 16)
            self._heldout = HeldoutSet.from_config(self.cfg, SpeechLM(self.blsp, self.processor, text_engine, 16), rows)
        module = engine.module
        module.eval()
        scores = self._heldout.teacher_forced(module, "speech")
        module.train()
        return {"heldout_nll": scores["nll"], "heldout_kl": scores["kl"]}

    def export(self, engine, out_dir: Path, rank: int) -> None:
        """Adapter-only checkpoint (``save_adapter``); collective under ZeRO-3 (the adapter is small)."""
        import deepspeed

        gather = (
            deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
            if engine.zero_optimization_stage() == 3 else contextlib.nullcontext()
        )
        with gather:
            if rank == 0:
                self.blsp.save_adapter(out_dir, self.lm_path, self.cfg.model.whisper_path)
                (Path(out_dir) / FROZEN_DIGEST).write_text(json.dumps(frozen_digest(self.blsp), indent=2))

    def load_export(self, hf_dir: Path) -> None:
        self.blsp.load_adapter(hf_dir)


def frozen_digest(blsp) -> dict[str, str]:
    """sha256 of the Whisper encoder's and the LM's weights: proof that stage 2 left them untouched."""
    out = {}
    for name in ("whisper_model", "llama_model"):
        h = hashlib.sha256()
        for key, tensor in sorted(getattr(blsp, name).state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


# ---- entry point: jobs/stage2.py ----


def run(cfg: BlspRayConfig) -> TrainResult:
    """Train on the connected (or a local) Ray cluster; the export goes to the run's ``stage2/model``."""
    init_ray(cfg)
    return run_training(cfg, Stage2Task)


def main(argv: list[str] | None = None) -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args(argv))
    result = run(cfg)
    print(f"stage2 exported to {result.export_dir}; final metrics {result.metrics}")
