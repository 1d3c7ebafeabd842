"""Per-latent analysis of an SAE over a capture in one streaming pass (``latents``).
Imports ``training.data`` and ``training.sae``."""
