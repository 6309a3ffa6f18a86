"""Our ``TrainConfig`` -> a DeepSpeed config dict (ZeRO stage, precision, batch, clipping, AdamW) and its LR schedule."""

from __future__ import annotations

import torch

from blsp_ray.config import TrainConfig


class WarmupDecay:
    """LR multiplier at an optimiser step: DeepSpeed's ``WarmupDecayLR`` (linear warm-up over
    ``warmup`` steps, then linear decay to 0), restarted at each phase start and peaking at that
    phase's scale (``phase_scales``, one per start; default 1). Stage 2's alignment warm-up and its
    objective are two phases; everything else is one.

    A callable object, not a lambda, so the scheduler's state (in DeepSpeed checkpoints) keeps it.
    """

    def __init__(self, phase_starts: list[int], total_steps: int, warmup: int, phase_scales: list[float] | None = None):
        if phase_starts[0] != 0 or sorted(set(phase_starts)) != list(phase_starts):
            raise ValueError(f"phase starts {phase_starts}: increasing, the first at step 0")
        scales = [1.0] * len(phase_starts) if phase_scales is None else list(phase_scales)
        if len(scales) != len(phase_starts):
            raise ValueError(f"{len(scales)} phase scales for {len(phase_starts)} phases")
        self.phase_starts, self.phase_scales = list(phase_starts), scales
        self.total_steps, self.warmup = max(total_steps, 1), warmup

    def __call__(self, step: int) -> float:
        phase = max(i for i, p in enumerate(self.phase_starts) if p <= step)
        start = self.phase_starts[phase]
        end = self.phase_starts[phase + 1] if phase + 1 < len(self.phase_starts) else self.total_steps
        k, n = step - start, max(end - start, 1)
        warmup = min(self.warmup, n - 1)
        shape = (k + 1) / warmup if k < warmup else max(n - k, 0) / max(n - warmup, 1)
        return self.phase_scales[phase] * shape


def lr_schedule(phase_starts: list[int], total_steps: int, warmup: int, phase_scales: list[float] | None = None):
    """``deepspeed.initialize(lr_scheduler=...)``: the optimiser DeepSpeed builds -> our schedule."""
    schedule = WarmupDecay(phase_starts, total_steps, warmup, phase_scales)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


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
