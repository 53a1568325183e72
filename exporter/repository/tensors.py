"""Tensor specs of an engine model, read from where they are true: the ONNX graph or the engine's engine.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BadInput, first_line

# ONNX TensorProto elem_type → Triton data type
_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}
# engine.json dtype names (numpy / TensorRT spelling) → Triton data type
_NAME_TO_TRITON = {
    "float32": "TYPE_FP32", "float": "TYPE_FP32", "float16": "TYPE_FP16", "half": "TYPE_FP16", "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
    "float64": "TYPE_FP64",
}
TRITON_TO_NUMPY = {
    "TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_FP64": "float64", "TYPE_INT64": "int64",
    "TYPE_INT32": "int32", "TYPE_INT8": "int8", "TYPE_UINT8": "uint8", "TYPE_BOOL": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_* name
    shape: tuple[int, ...]  # full shape, batch axis first; -1 for a dynamic axis

    def dims(self, batched: bool) -> list[int]:
        """Triton `dims`: without the batch axis when the model config has max_batch_size > 0."""
        return list(self.shape[1:] if batched else self.shape)


@dataclass(frozen=True)
class ModelIO:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str  # what the specs were read from, e.g. "onnx/fp32/model.onnx" or "engines/edge/engine.json"

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def _onnx_value(v) -> TensorSpec:
    t = v.type.tensor_type
    if t.elem_type not in _ONNX_TO_TRITON:
        raise BadInput(f"ONNX tensor {v.name!r} has element type {t.elem_type}, which Triton cannot serve")
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorSpec(v.name, _ONNX_TO_TRITON[t.elem_type], shape)


def _load_graph(onnx_path: Path):
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise BadInput(f"cannot read ONNX model {onnx_path}: {first_line(exc)}") from None


def onnx_io(onnx_path: Path, source: str) -> ModelIO:
    return _graph_io(_load_graph(onnx_path).graph, source)


def serving_graph_io(onnx_path: Path, kv_dtype: str, source: str) -> ModelIO:
    """The inputs/outputs of the decoder engine `build-engine` builds from this ONNX variant: its serving graph
    (exporter/engine/serving_graph.py: logits [batch, 1, vocab], the KV cache IO in `kv_dtype`), computed from the
    graph alone — what the repository describes before the engine exists."""
    from ..engine.serving_graph import engine_graph

    served, _ = engine_graph(_load_graph(onnx_path), kv_dtype)
    return _graph_io(served.graph, source)


def _graph_io(graph, source: str) -> ModelIO:
    initializers = {i.name for i in graph.initializer}
    inputs = [_onnx_value(v) for v in graph.input if v.name not in initializers]
    return ModelIO(inputs, [_onnx_value(v) for v in graph.output], source)


def engine_io(meta, source: str) -> ModelIO:
    def spec(t) -> TensorSpec:
        if t.dtype not in _NAME_TO_TRITON:
            raise BadInput(f"engine tensor {t.name!r} has dtype {t.dtype!r}, unknown to the repository writer")
        return TensorSpec(t.name, _NAME_TO_TRITON[t.dtype], tuple(t.shape))

    return ModelIO([spec(t) for t in meta.inputs], [spec(t) for t in meta.outputs], source)
