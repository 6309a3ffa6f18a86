"""Stage 2: train the speech adapter (Whisper encoder and LM frozen) on the run's preprocessed shards. (``blsp_ray.stages.stage2``)."""

from blsp_ray.stages.stage2 import main

if __name__ == "__main__":
    main()
