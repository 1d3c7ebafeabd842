"""The ML engine: everything that touches tensors. It imports nothing else of saelab and
knows nothing of databases, brokers or the web.

Subpackages, lowest first (an import-linter contract keeps each from importing a higher
one):

* ``data`` — model loading, corpus, capture, activation store, block hooks;
* ``sae`` — the SAE, its sparse kernels, its on-disk folder and SAELens' format;
* ``train`` — trainer, a whole run, sweeps, streams, distributed context, torchrun entry;
  ``evaluation`` — an SAE spliced into its model (CE loss recovered, KL, FVU);
  ``analysis`` — per-latent analysis; ``inference`` — sampling, steering, probe (these
  four import ``data`` and ``sae`` and not each other);
* ``autointerp`` — explainers, prompts, protocol, scoring, negatives, embeddings;
* ``bench`` — the engine's benchmarks (may import everything above).
"""
