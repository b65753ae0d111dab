"""Torch-free runtime for exported SPHINX-X models (sphinx_edge.runtime). Never imports torch."""
