"""Running a model with an SAE: sampling with a KV cache (``sampling``), steering by
clamping or adding latents (``steering``) and probing text for its latents (``probe``).
Imports ``training.data`` and ``training.sae``."""
