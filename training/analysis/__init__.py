"""Per-latent analysis of an SAE over a capture in one streaming pass (``latents``), the
examples it keeps (``examples``) and the decoder-only figures: logit effects and decoder
neighbours (``effects``). Imports ``training.data`` and ``training.sae``."""
