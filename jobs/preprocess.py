"""Offline preprocessing (Ray Data): labelled rows -> stage-2 parquet shards (waveform + token ids) (``blsp_ray.stages.preprocess``)."""

from blsp_ray.stages.preprocess import main

if __name__ == "__main__":
    main()
