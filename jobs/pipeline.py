"""The whole BLSP pipeline, stage by stage, as Ray jobs (the README's first command runs it on configs/mini.yaml).

Submit with ``ray job submit -- python -m jobs.pipeline --config configs/X.yaml``; the code is ``blsp_ray.stages.pipeline``.
"""

from blsp_ray.stages.pipeline import main

if __name__ == "__main__":
    main()
