"""Latency benchmarks (sphinx_edge.benchmarks)."""
