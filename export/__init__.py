"""ONNX export (onnx.py): graphs for ONNX Runtime and TensorRT, parity-checked. Running them is ``distill.inference``."""
