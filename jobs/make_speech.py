"""Make the demo's speech: sentences spoken on this machine into 16 kHz wav files, with train and held-out manifests.

Submit with ``ray job submit -- python -m jobs.make_speech --config configs/X.yaml``; the code is ``blsp_ray.stages.make_speech``.
"""

from blsp_ray.stages.make_speech import main

if __name__ == "__main__":
    main()
