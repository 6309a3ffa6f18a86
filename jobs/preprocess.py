"""Offline preprocessing on Ray Data: labelled rows -> stage-2 parquet shards (waveform + token ids).

Submit with ``ray job submit -- python -m jobs.preprocess --config configs/X.yaml``; the code is ``blsp_ray.stages.preprocess``.
"""

from blsp_ray.stages.preprocess import main

if __name__ == "__main__":
    main()
