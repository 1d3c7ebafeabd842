"""The engine's benchmarks, one module per ``saelab bench`` command: ``capture``, ``train``
(against SAELens' trainer, ``saelens``), ``analysis`` and ``steering``; ``timing`` holds the
shared timer and the dense-matmul reference. May import every other ``training``
subpackage."""
