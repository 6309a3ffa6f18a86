"""Build the config's models offline (no hub downloads). (``blsp_ray.stages.build_assets``)."""

from blsp_ray.stages.build_assets import main

if __name__ == "__main__":
    main()
