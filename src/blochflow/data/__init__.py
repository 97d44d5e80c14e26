"""Bundled example datasets (see examples/*/README for provenance)."""

from importlib import resources


def example_path(example: str, filename: str) -> str:
    """Path of a file of a bundled example, e.g. ``example_path("quartz", "quartz.cif_pets")``."""
    return str(resources.files("blochflow").joinpath("data", "examples", example, filename))
