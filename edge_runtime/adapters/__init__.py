"""Adapters: one module per outside library (onnxruntime, OpenCV, ...), translating its errors into ours."""
