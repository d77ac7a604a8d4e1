"""ldm_finetune: fine-tune latent diffusion models on X-ray tomography of 3D-woven composites.

Layers, each a sub-package that imports only the ones before it (ARCHITECTURE.md):
core <- data_prep <- data <- models <- sharing <- adapters <- training <- generation <- evaluation <- cli, demo.
Importing this package is cheap (no torch).
"""

from ldm_finetune.core.version import __version__

__all__ = ["__version__"]
