"""Batch speech generation with a BLSP checkpoint (the original release's generate.py) as a Ray Data job.

Submit with ``ray job submit -- python -m jobs.generate --config configs/X.yaml``; the code is ``blsp_ray.stages.generate``.
"""

from blsp_ray.stages.generate import main

if __name__ == "__main__":
    main()
