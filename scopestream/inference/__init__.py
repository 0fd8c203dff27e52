"""Model packages, architectures, tiling and backends (torch, ONNX Runtime, TensorRT)."""
