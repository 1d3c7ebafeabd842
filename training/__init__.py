"""The ML engine: everything that touches tensors. Imports nothing else of saelab."""
