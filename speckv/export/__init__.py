"""Export of a trained controller to ONNX: graph, simplification, metadata, parity and
latency checks."""
