"""Export: ONNX and ExecuTorch graphs of SPHINX-X models (sphinx_edge.export)."""
