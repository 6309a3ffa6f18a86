"""Build the config's models offline, without hub downloads: random-weight tiny models and/or packaged pretrained weights.

Submit with ``ray job submit -- python -m jobs.build_assets --config configs/X.yaml``; the code is ``blsp_ray.stages.build_assets``.
"""

from blsp_ray.stages.build_assets import main

if __name__ == "__main__":
    main()
