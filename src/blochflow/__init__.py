"""blochflow: differentiable Bloch-wave refinement of 3D electron diffraction data."""

__version__ = "0.1.0"
