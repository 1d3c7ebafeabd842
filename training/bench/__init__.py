"""The engine's benchmarks (``engine``: capture, training, analysis, steering; ``saelens``:
SAELens' trainer as the baseline). May import every other ``training`` subpackage."""
