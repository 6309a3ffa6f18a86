"""Our ``TrainConfig`` -> a DeepSpeed config dict (ZeRO stage, precision, batch, clipping, AdamW, LR schedule)."""

from __future__ import annotations

from blsp_ray.config import TrainConfig


def deepspeed_config(train: TrainConfig, total_steps: int, world_size: int) -> dict:
    """The DeepSpeed config of one run, as the seed's stage-1/2 scripts set it up.

    AdamW with a linear warm-up then linear decay (``WarmupDecayLR``) over ``total_steps``
    optimiser steps. ``offload_optimizer`` keeps optimiser state in host memory and steps it
    with DeepSpeedCPUAdam (the seed's stage-2 setting); otherwise plain torch AdamW, which
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
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": train.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,  # we log through ray.train.report
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return config
