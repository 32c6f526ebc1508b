"""ONNX Runtime backend: integer-kernel lowering and the artifact runtime."""
