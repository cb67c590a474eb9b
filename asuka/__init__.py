"""asuka: a toolkit for diffusion image inpainting (ASUKA's learned parts and training-free methods)."""

__version__ = "0.1.0"
