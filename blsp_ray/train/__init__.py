"""The one Ray Train + DeepSpeed training loop behind stage 1 and stage 2 (``blsp_ray.stages.stage1`` / ``stage2``
say what differs: a ``Task``)."""
