"""ldm_finetune: fine-tune latent diffusion models on X-ray tomography of 3D-woven composites.

Importing this package is cheap (no torch): heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
