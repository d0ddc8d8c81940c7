"""Deployment: checkpoints plain Ultralytics loads, ONNX and TensorRT export (issue #6)."""
