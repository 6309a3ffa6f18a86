"""Our ``TrainConfig`` -> a DeepSpeed config dict (ZeRO stage, precision, batch, clipping, AdamW) and its LR schedule."""

from __future__ import annotations

import torch

from blsp_ray.config import TrainConfig


class WarmupDecay:
    """LR multiplier at an optimiser step: DeepSpeed's ``WarmupDecayLR`` (linear warm-up over
    ``warmup`` steps, then linear decay to 0), restarted at each phase start. Stage 2's alignment
    warm-up and its objective are two phases; everything else is one.

    A callable object, not a lambda, so the scheduler's state (in DeepSpeed checkpoints) keeps it.
    """

    def __init__(self, phase_starts: list[int], total_steps: int, warmup: int):
        self.phase_starts, self.total_steps, self.warmup = sorted(set(phase_starts) | {0}), max(total_steps, 1), warmup

    def __call__(self, step: int) -> float:
        start = max(p for p in self.phase_starts if p <= step)
        end = min([p for p in self.phase_starts if p > step] + [self.total_steps])
        k, n = step - start, max(end - start, 1)
        warmup = min(self.warmup, n - 1)
        if k < warmup:
            return (k + 1) / warmup
        return max(n - k, 0) / max(n - warmup, 1)


def lr_schedule(phase_starts: list[int], total_steps: int, warmup: int):
    """``deepspeed.initialize(lr_scheduler=...)``: the optimiser DeepSpeed builds -> our schedule."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(phase_starts, total_steps, warmup))


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of one run, as the original release's stage-1/2 scripts set it up.

    AdamW; the schedule is ``lr_schedule``'s. ``offload_optimizer`` keeps optimiser state in host memory and steps it
    with DeepSpeedCPUAdam (the original release's stage-2 setting); otherwise plain torch AdamW, which
    needs no compiled op on CPU.
    """
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer:
        if train.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.zero_stage == 3:
        # Gather the partitioned weights for the Hugging Face export at checkpoint time.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    optimizer_params = {
        "lr": train.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": train.weight_decay,
        "adam_w_mode": True,
    }
    if not train.offload_optimizer:
        optimizer_params["torch_adam"] = True
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 10**9,  # we log through ray.train.report
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config
