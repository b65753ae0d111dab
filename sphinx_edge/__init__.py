"""sphinx-edge: SPHINX-X multimodal LLMs on edge devices.

Kept light on purpose: the torch-free runtime imports this package, so nothing heavy
(torch, transformers) is imported here.
"""

__version__ = "0.1.0"
