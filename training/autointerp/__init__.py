"""Automated interpretability: the explain-and-score drivers (``explain``), the data they
take (``records``), prompts (``prompts``), the explainer protocol (``protocol``), detection
and fuzzing scoring (``scoring``), explainers (``claude``, ``local``), negative contexts
(``negatives``) and sentence embeddings for search (``embeddings``). May import ``data``,
``sae`` and ``inference``."""
