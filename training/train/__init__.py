"""Training: the optimiser loop (``trainer``), a whole run from a capture to a saved SAE
(``run``), sweeps from one read (``sweep``) and runs straight from the model (``stream``),
the distributed context (``distributed``) and the per-process entry torchrun starts
(``launch``: ``python -m training.train.launch SPEC RESULT``). Imports ``training.data``
and ``training.sae``."""
