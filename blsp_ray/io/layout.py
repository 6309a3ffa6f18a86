"""Where each stage of a run reads and writes: ``<storage_root>/<run_id>/<stage>/...``.

One place for the run layout so stages agree on it without knowing about each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from blsp_ray.config import BlspRayConfig
from blsp_ray.io.storage import list_dir

COMPLETE = "_COMPLETE"  # marker a stage's directory gets when the stage has finished


def join(root: str, *parts: str) -> str:
    """Join path parts for local paths and s3:// URIs alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class RunLayout:
    root: str  # <storage_root>/<run_id>

    @classmethod
    def of(cls, cfg: BlspRayConfig) -> RunLayout:
        return cls(join(cfg.cluster.storage_root, cfg.cluster.run_id))

    def stage(self, name: str) -> str:
        return join(self.root, name)

    # data preparation
    @property
    def stage1_data(self) -> str:  # stage-1 jsonl ({"instruction", "output"})
        return join(self.root, "data", "stage1.jsonl")

    @property
    def asr_manifests(self) -> str:  # prepared ASR manifests, one jsonl per source
        return join(self.root, "data", "asr")

    # stages
    @property
    def stage1_model(self) -> str:  # Hugging Face LM checkpoint (+ tokenizer)
        return join(self.root, "stage1", "model")

    @property
    def labels(self) -> str:  # labelled parquet shards: input row + continuation
        return join(self.root, "label", "shards")

    @property
    def preprocessed(self) -> str:  # stage-2 parquet shards: waveform + token ids
        return join(self.root, "preprocess", "shards")

    @property
    def stage2_model(self) -> str:  # adapter-only BLSP checkpoint
        return join(self.root, "stage2", "model")

    @property
    def generations(self) -> str:
        return join(self.root, "generate")

    @property
    def evaluation(self) -> str:
        return join(self.root, "evaluate")


def run_asr_manifests(cfg: BlspRayConfig) -> list[str]:
    """The run's ASR manifests: ``label.manifests``, else the run's prepared manifests, else ``data.asr_manifests``."""
    if cfg.label.manifests:
        return list(cfg.label.manifests)
    layout = RunLayout.of(cfg)
    prepared = [join(layout.asr_manifests, n) for n in list_dir(layout.asr_manifests, cfg.cluster.s3) if n.endswith(".jsonl")]
    if prepared:
        return prepared
    if cfg.data.asr_manifests:
        return list(cfg.data.asr_manifests)
    raise ValueError(f"no ASR manifests: set label.manifests or data.asr_manifests, or prepare {layout.asr_manifests}")
