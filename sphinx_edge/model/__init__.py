"""PyTorch modules of the SPHINX-X family."""
