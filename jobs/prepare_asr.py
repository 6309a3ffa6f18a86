"""LibriSpeech / GigaSpeech / Common Voice in their released layouts -> ASR manifests of the run (``blsp_ray.stages.prepare_asr``)."""

from blsp_ray.stages.prepare_asr import main

if __name__ == "__main__":
    main()
