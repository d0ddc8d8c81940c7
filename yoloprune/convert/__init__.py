"""Model conversion below the evaluators: ONNX export through Ultralytics' exporter and INT8 Q/DQ quantization.

The latency backends time what this package writes, and ``yoloprune export`` ships it.
"""
