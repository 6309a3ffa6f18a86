"""Stage 1: full fine-tuning of the LM on instruction data; loss only on the response.

The task is built on the driver (dataset) and again inside each Ray Train worker (model, loss,
export) from the same config, so nothing heavy is pickled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ray.data
import torch
from torch import nn
from transformers import LlamaForCausalLM

from blsp_ray.config import BlspRayConfig, TrainConfig
from blsp_ray.io.layout import RunLayout
from blsp_ray.io.storage import local_copy
from blsp_ray.model.processing import IGNORE, BlspProcessor, as_ids, load_tokenizer, pad_ids
from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.runtime import init_ray
from blsp_ray.train.loop import Phase, TrainResult, full_state_dict, run_training

log = logging.getLogger(__name__)


def tokenize_stage1(batch: dict, lm_path: str, max_tokens: int, prompt_format: str = "original") -> dict:
    """Ray Data map: {"instruction","output"} rows -> input_ids, labels, length (bad rows dropped, counted)."""
    tokenizer = load_tokenizer(local_copy(lm_path))
    processor = BlspProcessor(tokenizer, feature_extractor=None, prompt_format=prompt_format)
    ids, labels, lengths = [], [], []
    dropped = 0
    for instruction, output in zip(batch["instruction"], batch["output"]):
        if not isinstance(instruction, str) or not isinstance(output, str) or not instruction.strip() or not output.strip():
            dropped += 1
            continue
        ex = processor.text_example(instruction, output, max_tokens)
        if not any(l != IGNORE for l in ex["labels"]):  # prompt alone fills max_tokens: nothing to learn
            dropped += 1
            continue
        ids.append(np.asarray(ex["input_ids"], dtype=np.int64))
        labels.append(np.asarray(ex["labels"], dtype=np.int64))
        lengths.append(len(ex["input_ids"]))
    if dropped:
        log.warning("stage 1: dropped %d of %d rows (empty instruction/output or prompt over %d tokens)",
                    dropped, len(batch["instruction"]), max_tokens)
    return {"input_ids": ids, "labels": labels, "length": np.asarray(lengths, dtype=np.int64)}


class Stage1Task:
    """Full fine-tuning of the LM on instruction data; loss only on the response."""

    name = "stage1"

    def __init__(self, cfg: BlspRayConfig):
        self.cfg = cfg
        self.layout = RunLayout.of(cfg)

    @property
    def train(self) -> TrainConfig:
        return self.cfg.stage1

    @property
    def export_target(self) -> str:
        return self.layout.stage1_model

    phases = [Phase(0, 1.0, "instruction tuning (CE on the response)")]

    def dataset(self) -> tuple[ray.data.Dataset, int]:
        path = self.layout.stage1_data
        ds = ray.data.read_json(path, lines=True)
        ds = ds.map_batches(
            tokenize_stage1,
            fn_kwargs={"lm_path": self.cfg.model.lm_path, "max_tokens": self.cfg.data.max_stage1_tokens,
                       "prompt_format": self.cfg.model.prompt_format},
            batch_format="numpy",
            batch_size=256,
        )
        # Token ids are small (Alpaca's 52k rows: at most ~300 MB): tokenised once, counted and read
        # by every epoch from the object store, instead of read and tokenised again for each.
        ds = ds.materialize()
        return ds, ds.count()

    # -- worker side --

    def build(self, dtype: torch.dtype) -> nn.Module:
        self.lm = LlamaForCausalLM.from_pretrained(self.cfg.model.lm_path, dtype=dtype)
        self.lm.train()
        return self.lm

    def collate(self, rows: list[dict]) -> dict:
        pad_id = load_tokenizer(local_copy(self.cfg.model.lm_path)).pad_token_id
        ids = [as_ids(r["input_ids"]) for r in rows]
        return {
            "input_ids": pad_ids(ids, pad_id),
            "attention_mask": pad_ids([[1] * len(i) for i in ids], 0),
            "labels": pad_ids([as_ids(r["labels"]) for r in rows], IGNORE),
        }

    def loss(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": engine(**batch).loss}

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def export(self, engine, out_dir: Path, rank: int) -> None:
        """Hugging Face LM dir (weights + tokenizer); collective under ZeRO-3."""
        state = full_state_dict(engine, rank)
        if rank != 0:
            return
        self.lm.save_pretrained(out_dir, state_dict=state)  # state None: the module's own weights
        load_tokenizer(local_copy(self.cfg.model.lm_path)).save_pretrained(out_dir)

    def heldout_metrics(self, engine) -> dict[str, float]:
        return {}  # stage 1 has no held-out speech to score

    def load_export(self, hf_dir: Path) -> None:
        """Weights from a previous export (resuming on a different number of workers)."""
        self.lm.load_state_dict(LlamaForCausalLM.from_pretrained(hf_dir, dtype=self.lm.dtype).state_dict())


# ---- entry point: jobs/stage1.py ----


def run(cfg: BlspRayConfig) -> TrainResult:
    """Train on the connected (or a local) Ray cluster; the export goes to the run's ``stage1/model``."""
    init_ray(cfg)
    return run_training(cfg, Stage1Task)


def main(argv: list[str] | None = None) -> None:
    cfg = load_job_config(job_parser(__doc__).parse_args(argv))
    result = run(cfg)
    print(f"stage1 exported to {result.export_dir}; final metrics {result.metrics}")
