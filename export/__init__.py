"""ONNX export (onnx.py) and the ONNX Runtime inference class (runtime.py)."""
