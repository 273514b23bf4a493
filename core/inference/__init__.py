"""Scoring new examples with a finished training run (``workbench predict``) and its ONNX export."""
