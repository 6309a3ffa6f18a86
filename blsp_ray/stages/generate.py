"""Speech inference: the seed's ``generate.py`` as a Ray Data batch job, and the reusable
``SpeechGenerator`` (speech -> Whisper + adapter embeddings -> LM engine) that serving shares.

Job: rows ``{"audio": path, ...}`` -> decode + log-mel features in CPU tasks -> ``SpeechGenerator``
in an actor pool (one replica per GPU on clusters) -> rows in input order with ``response``
added (or ``error`` for a row that could not be used; the rest go on).

Engines: ``vllm`` gets the spliced [prefix | speech | suffix] embeddings as ``prompt_embeds``
(vLLM batches them like any prompt); ``transformers`` runs ``BlspModel.generate`` on the same
spliced embeddings. Both greedy by default, and tested to agree.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from blsp_ray.model.audio import AudioError, load_audio
from blsp_ray.config import BlspRayConfig, EngineConfig, S3Config
from blsp_ray.engines import (
    Generation,
    GenerationSettings,
    TransformersEngine,
    VllmEngine,
    engine_pool,
)
from blsp_ray.model.modeling import ADAPTER_CONFIG, BlspModel, SpeechBatch, load_blsp
from blsp_ray.model.processing import BlspProcessor, log_mel
import argparse
from blsp_ray.cli import load_job_config
from blsp_ray.config import config_from_dict

log = logging.getLogger(__name__)


def local_checkpoint(uri: str, s3: S3Config | None = None) -> str:
    """A local directory for a BLSP checkpoint given as a path or s3:// URI (copied once per node).

    An adapter-only checkpoint of an S3 run points at its frozen LM by URI (the run's stage-1
    model): then the bases are made local too, and a view of the checkpoint (links to its files,
    its adapter config naming the local copies) is what comes back, for ``load_blsp`` and vLLM.
    """
    import hashlib

    from blsp_ray.io.storage import cache_dir, is_s3, local_copy, model_cache

    path = Path(local_copy(uri, s3))
    meta_file = path / ADAPTER_CONFIG
    if not meta_file.exists():
        return str(path)
    meta = json.loads(meta_file.read_text())
    remote = {k: meta[k] for k in ("lm_path", "whisper_path") if is_s3(meta.get(k, ""))}
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


class SpeechGenerator:
    """Whisper + adapter + LM behind one call: waveforms (or features) + instruction -> text.

    ``generate(waveforms, instruction)`` / ``generate_features(...)`` take a batch and return one
    ``Generation`` per clip, in order. ``speech_prompt_embeds`` exposes the per-clip LM-space prompt
    ([L, hidden]) for callers that drive their own vLLM engine (e.g. an async serving engine built
    from ``engines.vllm_engine_kwargs(cfg, self.lm_path, enable_prompt_embeds=True)``).
    """

    def __init__(self, blsp_model: str, cfg: EngineConfig, settings: GenerationSettings | None = None,
                 dtype: str = "float32", pad_audio_to_30s: bool | None = None):
        self.cfg = cfg
        self.settings = settings or GenerationSettings.from_config(cfg)
        torch_dtype = getattr(torch, dtype)
        self.model: BlspModel = load_blsp(blsp_model, dtype=torch_dtype, pad_audio_to_30s=pad_audio_to_30s).eval()
        self.lm_path = self._lm_dir(blsp_model)
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        whisper_path = self._whisper_dir(blsp_model)
        self.processor = BlspProcessor(AutoTokenizer.from_pretrained(self.lm_path), WhisperFeatureExtractor.from_pretrained(whisper_path),
                                       self.model.config.pad_audio_to_30s)
        self.tokenizer = self.processor.tokenizer
        self.engine = None
        if cfg.engine == "vllm":
            self.engine = VllmEngine(self.lm_path, cfg, self.settings, enable_prompt_embeds=True, dtype=dtype)
        self._hf = TransformersEngine(self.model.llama_model, self.tokenizer, self.settings, cfg.batch_size)

    def _lm_dir(self, blsp_model: str) -> str:
        meta = Path(blsp_model) / ADAPTER_CONFIG
        if meta.exists():
            return json.loads(meta.read_text())["lm_path"]
        # A full BLSP checkpoint: the LM (+ tokenizer) must stand alone for vLLM.
        out = Path(tempfile.mkdtemp(prefix="blsp-lm-"))
        self.model.llama_model.save_pretrained(out)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(blsp_model).save_pretrained(out)
        return str(out)

    def _whisper_dir(self, blsp_model: str) -> str:
        meta = Path(blsp_model) / ADAPTER_CONFIG
        return json.loads(meta.read_text())["whisper_path"] if meta.exists() else blsp_model

    @property
    def engine_name(self) -> str:
        return self.cfg.engine

    # ---- speech -> prompt embeddings ------------------------------------------------------------

    def features(self, waveforms: Sequence[np.ndarray]) -> SpeechBatch:
        return self.processor.features(waveforms)

    @torch.no_grad()
    def speech_prompt_embeds(self, speech: SpeechBatch, instructions: Sequence[str]) -> list[torch.Tensor]:
        """[prefix | speech | suffix] embeddings of each clip: a list of [L_i, hidden] (no padding)."""
        batch = self.processor.collate_speech([self.processor.speech_prompt(i) for i in instructions])
        speech_embeds, speech_lengths = self.model.speech_embeddings(speech)  # [B, S, H], [B]
        embeds, mask, _ = self.model.splice(batch["prefix_ids"], batch["prefix_mask"], speech_embeds, speech_lengths,
                                            batch["suffix_ids"], batch["suffix_mask"])  # right padded [B, L, H]
        return [embeds[i, : int(mask[i].sum())].float() for i in range(embeds.shape[0])]

    # ---- generation -----------------------------------------------------------------------------

    def generate_features(self, speech: SpeechBatch, instructions: str | Sequence[str]) -> list[Generation]:
        if isinstance(instructions, str):
            instructions = [instructions] * speech.features.shape[0]
        if self.engine is not None:
            return self.engine.generate_embeds(self.speech_prompt_embeds(speech, instructions))
        return self._generate_transformers(speech, instructions)

    def generate(self, waveforms: Sequence[np.ndarray], instructions: str | Sequence[str]) -> list[Generation]:
        return self.generate_features(self.features(waveforms), instructions)

    @torch.no_grad()
    def _generate_transformers(self, speech: SpeechBatch, instructions: Sequence[str]) -> list[Generation]:
        """``BlspModel.generate`` (left-padded splice) in batches of ``cfg.batch_size``."""
        out = []
        bs = self.cfg.batch_size
        for s in range(0, len(instructions), bs):
            part = SpeechBatch(speech.features[s : s + bs], speech.frame_lengths[s : s + bs])
            part = SpeechBatch(part.features[..., : int(part.frame_lengths.max())] if not self.model.config.pad_audio_to_30s
                               else part.features, part.frame_lengths)
            batch = self.processor.collate_speech([self.processor.speech_prompt(i) for i in instructions[s : s + bs]])
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            new = self.model.generate(batch["prefix_ids"], batch["prefix_mask"], batch["suffix_ids"], batch["suffix_mask"],
                                      speech=part, **self._hf._generate_kwargs())
            out.extend(self._hf._finish(new))
        return out


# ---- the batch job ------------------------------------------------------------------------------------


def decode_row(row: dict, feature_extractor_path: str, max_duration_s: float, pad_audio_to_30s: bool = False) -> dict:
    """CPU task: audio -> log-mel features [n_mels, F] (flattened) or an error naming the reason."""
    out = {"index": row["index"], "source_json": row["source_json"], "error": "", "features": np.zeros(0, np.float32),
           "n_mels": 0, "frames": 0}
    try:
        item = json.loads(row["source_json"])
        if not isinstance(item, dict) or not isinstance(item.get("audio"), str):
            raise AudioError("bad_row", f"row {row['index']}: no audio path")
        wav = load_audio(item["audio"])
        if len(wav) / 16000 >= max_duration_s:
            raise AudioError("too_long", f"{item['audio']}: {len(wav) / 16000:.1f}s >= {max_duration_s}s")
        # The clip's own frames only (30 s only where the encoder reads the padding), as in training.
        speech = log_mel(_feature_extractor(feature_extractor_path), [wav], pad_audio_to_30s)
        feats = speech.features[0].numpy()  # [n_mels, F]
        out.update(features=feats.ravel(), n_mels=feats.shape[0], frames=int(speech.frame_lengths[0]))
    except AudioError as err:
        out["error"] = str(err)
    except (json.JSONDecodeError, ValueError) as err:
        out["error"] = f"bad_row: {err}"
    return out


_FE = {}


def _feature_extractor(path: str):
    if path not in _FE:
        from transformers import WhisperFeatureExtractor

        _FE[path] = WhisperFeatureExtractor.from_pretrained(path)
    return _FE[path]


class SpeechGenerationActor:
    """Ray Data actor: one SpeechGenerator replica; rows with an error pass through untouched."""

    def __init__(self, blsp_model: str, cfg: EngineConfig, instruction: str, dtype: str = "float32",
                 s3: S3Config | None = None):
        # blsp_model may be s3://: each replica's node makes its own local copy.
        self.generator = SpeechGenerator(local_checkpoint(blsp_model, s3), cfg, dtype=dtype)
        self.instruction = instruction

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        ok = [i for i in range(n) if not batch["error"][i]]
        responses, errors = [""] * n, list(batch["error"])
        if ok:
            feats = [np.asarray(batch["features"][i], np.float32).reshape(int(batch["n_mels"][i]), -1) for i in ok]
            width = max(f.shape[1] for f in feats)
            padded = np.zeros((len(ok), feats[0].shape[0], width), np.float32)  # [B, n_mels, F]; masked by lengths
            for j, f in enumerate(feats):
                padded[j, :, : f.shape[1]] = f
            speech = SpeechBatch(torch.from_numpy(padded), torch.tensor([int(batch["frames"][i]) for i in ok]))
            try:
                gens = self.generator.generate_features(speech, self.instruction)
                for i, g in zip(ok, gens):
                    responses[i] = g.text.strip()
            except Exception as err:  # a batch the model rejects: mark its rows, keep the job going
                log.exception("generation failed for a batch")
                for i in ok:
                    errors[i] = f"generation_failed: {err}"
        return {"index": batch["index"], "source_json": batch["source_json"], "response": responses, "error": errors}


def read_rows(input_file: str, s3: S3Config | None = None) -> list[dict]:
    from blsp_ray.io.storage import open_input

    with open_input(input_file, s3) as f:
        lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace").read().splitlines()
    return [{"index": i, "source_json": line} for i, line in enumerate(lines) if line.strip()]


def run_generate(cfg: BlspRayConfig, input_file: str, output_file: str, blsp_model: str) -> dict:
    """Generate a response for every row of ``input_file``; write ``output_file`` in input order."""
    import ray

    from blsp_ray.runtime import init_ray
    from blsp_ray.io.storage import open_output

    t0 = time.time()
    gc, s3 = cfg.generate, cfg.cluster.s3
    from blsp_ray.io.storage import is_s3

    blsp_model = blsp_model if is_s3(blsp_model) else str(Path(blsp_model).resolve())  # actors run elsewhere
    meta = Path(local_checkpoint(blsp_model, s3)) / ADAPTER_CONFIG  # the driver's copy: audio settings
    whisper_path = json.loads(meta.read_text())["whisper_path"] if meta.exists() else str(meta.parent)
    rows = read_rows(input_file, s3)
    init_ray(cfg)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * max(1, gc.max_replicas))))
    pad30 = json.loads(meta.read_text()).get("pad_audio_to_30s", False) if meta.exists() else cfg.model.pad_audio_to_30s
    ds = ds.map(decode_row, fn_kwargs=dict(feature_extractor_path=whisper_path, max_duration_s=cfg.data.max_duration_s,
                                           pad_audio_to_30s=pad30), num_cpus=0.5)
    ds = ds.map_batches(SpeechGenerationActor, fn_constructor_kwargs=dict(blsp_model=blsp_model, cfg=gc, instruction=gc.instruction,
                                                                          dtype=gc.engine_dtype(cfg.model), s3=s3),
                        batch_size=gc.batch_size, compute=engine_pool(gc),
                        num_cpus=gc.cpus_per_replica, num_gpus=gc.gpus_per_replica,
                        resources=dict(gc.resources_per_replica) or None)
    results = sorted(ds.take_all(), key=lambda r: r["index"])
    out_rows, n_err = [], 0
    for r in results:
        try:
            row = json.loads(r["source_json"])
            row = row if isinstance(row, dict) else {"input": row}
        except json.JSONDecodeError:
            row = {"input": r["source_json"]}
        if r["error"]:
            row["error"] = r["error"]
            n_err += 1
        else:
            row["response"] = r["response"]
        out_rows.append(row)
    with open_output(output_file, "w", s3) as f:
        for row in out_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    wall = time.time() - t0
    summary = {"rows": len(out_rows), "ok": len(out_rows) - n_err, "errors": n_err, "wall_s": round(wall, 2),
               "rows_per_s": round(len(out_rows) / wall, 3), "engine": gc.engine, "output": output_file}
    print(f"[generate] {summary['ok']} responses, {n_err} errors, {summary['rows_per_s']} rows/s ({gc.engine}) -> {output_file}",
          flush=True)
    return summary


# ---- entry point: jobs/generate.py ----


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (cluster, generate section); default: local CPU settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--input_file", required=True, help="jsonl rows {\"audio\": path, ...} (local or s3://)")
    p.add_argument("--output_file", required=True)
    p.add_argument("--blsp_model", required=True, help="BLSP checkpoint directory (adapter-only or full; local or s3://)")
    p.add_argument("--instruction", default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--engine", choices=["vllm", "transformers"], default=None)
    args = p.parse_args()
    if args.config:
        cfg = load_job_config(args)
    else:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = config_from_dict({"model": {"lm_path": "", "whisper_path": ""}})  # paths come from --blsp_model
    for key in ("instruction", "max_new_tokens", "temperature", "top_p", "batch_size", "engine"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg.generate, key, value)
    run_generate(cfg, args.input_file, args.output_file, args.blsp_model)
