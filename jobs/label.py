"""Continuation labelling (the seed's ``continue_writing``): the stage-1 LM continues every ASR (``blsp_ray.stages.label``)."""

from blsp_ray.stages.label import main

if __name__ == "__main__":
    main()
