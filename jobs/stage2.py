"""Stage 2: train the speech adapter (Whisper encoder and LM frozen) on the run's preprocessed shards (Ray Train + DeepSpeed).

Submit with ``ray job submit -- python -m jobs.stage2 --config configs/X.yaml``; the code is ``blsp_ray.stages.stage2``.
"""

from blsp_ray.stages.stage2 import main

if __name__ == "__main__":
    main()
