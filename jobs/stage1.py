"""Stage 1: full fine-tuning of the LM on the run's instruction data (Ray Train + DeepSpeed).

Submit with ``ray job submit -- python -m jobs.stage1 --config configs/X.yaml``; the code is ``blsp_ray.stages.stage1``.
"""

from blsp_ray.stages.stage1 import main

if __name__ == "__main__":
    main()
