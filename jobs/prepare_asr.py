"""LibriSpeech / GigaSpeech / Common Voice in their released layouts -> the run's ASR manifests.

Submit with ``ray job submit -- python -m jobs.prepare_asr --config configs/X.yaml``; the code is ``blsp_ray.stages.prepare_asr``.
"""

from blsp_ray.stages.prepare_asr import main

if __name__ == "__main__":
    main()
