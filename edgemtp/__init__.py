"""edgemtp: ONNX bundles and multi-token-prediction speculative decoding for edge devices."""

__version__ = "0.1.0"
