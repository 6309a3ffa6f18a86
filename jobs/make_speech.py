"""Make the demo corpus: sentences spoken into 16 kHz wav files with train/held-out manifests, and (``blsp_ray.stages.make_speech``)."""

from blsp_ray.stages.make_speech import main

if __name__ == "__main__":
    main()
