"""Run the whole BLSP pipeline as Ray jobs (the README's first command runs this on configs/mini.yaml). (``blsp_ray.stages.pipeline``)."""

from blsp_ray.stages.pipeline import main

if __name__ == "__main__":
    main()
