"""Speech generation with a BLSP checkpoint (the seed's generate.py) as a Ray Data batch job. (``blsp_ray.stages.generate``)."""

from blsp_ray.stages.generate import main

if __name__ == "__main__":
    main()
