"""r1deploy: checkpoint → ONNX → quantized ONNX → TensorRT engine → Triton repository → Kubernetes manifests.

Every stage is a library function taking a typed config and returning a typed result; `exporter.cli` is a thin
Click layer over them. Quantization lives in the sibling package `quantize`.
"""

__version__ = "0.1.0"
