"""Cloud counterpart of edge-runtime. Imports edge_runtime.core only, never onnxruntime or OpenCV."""
