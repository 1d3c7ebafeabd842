"""Training: the optimiser loop (``trainer``), a whole run from a capture to a saved SAE
(``run``), the distributed context (``distributed``), the per-process entry torchrun starts
(``launch``: ``python -m training.train.launch SPEC RESULT``) and the metrics of an SAE
spliced into its model (``metrics``). Imports ``training.data`` and ``training.sae``."""
