"""Stage 1 and stage 2 training: one Ray Train + DeepSpeed loop, two tasks (see ``tasks``)."""

from blsp_ray.train.loop import TrainResult, run_training


def run_stage1(cfg) -> TrainResult:
    """Full fine-tuning of the LM on the run's stage-1 jsonl; export to ``RunLayout.stage1_model``."""
    return run_training(cfg, "stage1")


def run_stage2(cfg) -> TrainResult:
    """Adapter training on the run's preprocessed shards; export to ``RunLayout.stage2_model``."""
    return run_training(cfg, "stage2")


__all__ = ["TrainResult", "run_stage1", "run_stage2", "run_training"]
