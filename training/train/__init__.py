"""Training: the optimiser loop (``trainer``), a whole run from a capture to a saved SAE
(``run``), sweeps from one read (``sweep``) and runs straight from the model (``stream``),
the distributed context (``distributed``), the per-process entry torchrun starts
(``launch``: ``python -m training.train.launch SPEC RESULT``) and the metrics of an SAE
spliced into its model (``metrics``, with the shared zero-ablated pass in ``ablation``).
Imports ``training.data`` and ``training.sae``."""
