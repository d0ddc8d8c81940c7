"""yoloprune: automated per-stage structured-pruning search for Ultralytics YOLO detectors."""

__version__ = "0.1.0"
