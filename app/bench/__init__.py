"""Benchmarks of the store, the jobs system, the explorer and explain jobs. Like the CLI
that runs them, they sit above ``worker`` (they run jobs in this process)."""
