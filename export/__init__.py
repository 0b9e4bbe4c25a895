"""torch -> ONNX for T-MLP models: export, graph checks, parity, metadata and int8 quantization."""
