"""Evaluation of an SAE spliced into its model: the figures (``metrics``: FVU, L0, CE loss
recovered, ΔLM loss, KL), one batch's passes (``passes``), the forward after block L that
the edited passes share (``suffix``), the zero-ablated pass shared by every batch
(``ablation``), the losses a chunk of positions at a time (``losses``) and the clean pass
kept for later evaluations of the same text (``records``, named by ``record_key``).
Imports ``training.data`` and ``training.sae``."""
