"""ONNX files on disk without holding a second copy of the weights in memory.

The exporters build the graph while the PyTorch weights are in memory; serialising a ModelProto with the weights
inside costs one or two more copies (the proto and its bytes). r1deploy always exports with external data
(weights streamed from the tensors to `model.onnx.data`) and, when the model is below the external-data
threshold, folds the weights back into a single file here — writing the protobuf wire format tensor by tensor,
so the peak memory is the graph plus one read buffer.

Wire format used (protobuf: a message is its fields concatenated; a nested message is tag + length + bytes;
repeated fields may appear anywhere and keep their order):
ModelProto.graph = field 7, GraphProto.initializer = field 5, TensorProto.raw_data = field 9.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

_MODEL_GRAPH_TAG = bytes([(7 << 3) | 2])
_GRAPH_INITIALIZER_TAG = bytes([(5 << 3) | 2])
_TENSOR_RAW_DATA_TAG = bytes([(9 << 3) | 2])
_CHUNK = 1 << 24


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def inline_external_data(path: Path) -> None:
    """Rewrite `path` (graph + external data files beside it) as one self-contained ONNX file."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    pieces: list[tuple[bytes, Path | None, int, int]] = []  # (tensor header, data file, offset, length)
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            pieces.append((tensor.SerializeToString(), None, 0, 0))
            continue
        info = ExternalDataInfo(tensor)
        data_file = path.parent / info.location
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None else data_file.stat().st_size - offset
        header = onnx.TensorProto()
        header.CopyFrom(tensor)
        del header.external_data[:]
        header.data_location = onnx.TensorProto.DEFAULT
        header.ClearField("data_location")
        pieces.append((header.SerializeToString(), data_file, offset, length))
    for node_graph in _subgraphs(model.graph):
        if any(uses_external_data(t) for t in node_graph.initializer):
            raise ValueError("external data inside a subgraph is not supported by the streaming writer")
    data_files = {p[1] for p in pieces if p[1] is not None}
    del model.graph.initializer[:]
    graph_rest = model.graph.SerializeToString()
    model.ClearField("graph")
    model_rest = model.SerializeToString()

    def tensor_size(header: bytes, length: int, external: bool) -> int:
        return len(header) + (len(_TENSOR_RAW_DATA_TAG) + len(_varint(length)) + length if external and length else 0)

    sizes = [tensor_size(h, n, f is not None) for h, f, _, n in pieces]
    graph_len = len(graph_rest) + sum(len(_GRAPH_INITIALIZER_TAG) + len(_varint(s)) + s for s in sizes)
    tmp = path.with_name(path.name + ".inline-tmp")
    with open(tmp, "wb") as out:
        out.write(model_rest + _MODEL_GRAPH_TAG + _varint(graph_len) + graph_rest)
        for (header, data_file, offset, length), size in zip(pieces, sizes, strict=True):
            out.write(_GRAPH_INITIALIZER_TAG + _varint(size) + header)
            if data_file is None or not length:
                continue
            out.write(_TENSOR_RAW_DATA_TAG + _varint(length))
            with open(data_file, "rb") as src:
                src.seek(offset)
                left = length
                while left:
                    block = src.read(min(_CHUNK, left))
                    if not block:
                        raise ValueError(f"{data_file} is shorter than its tensors say")
                    out.write(block)
                    left -= len(block)
    tmp.replace(path)
    for f in data_files:
        f.unlink()


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
                yield from _subgraphs(attr.g)
            for g in attr.graphs:
                yield g
                yield from _subgraphs(g)


def attach_external_weights(out: Path, weights: Mapping[str, object], as_array: Callable[[object], np.ndarray]) -> None:
    """Turn the graph inputs of `out` named in `weights` into initializers whose data is written, tensor by tensor,
    straight to `model.onnx.data` beside it (64-byte aligned, so ONNX Runtime can map them). `as_array` gives a
    numpy view of a weight, possibly strided (a transposed matrix): it is written in row blocks of ≤ 16 MiB, so
    no whole contiguous copy is made."""
    model = onnx.load(str(out), load_external_data=False)
    graph = model.graph
    target = out.parent / "model.onnx.data"
    offset = target.stat().st_size if target.exists() else 0
    kept = []
    with open(target, "ab") as data:
        for value in graph.input:
            if value.name not in weights:
                kept.append(value)
                continue
            array = as_array(weights[value.name])
            tensor = onnx.TensorProto(name=value.name, dims=array.shape,
                                      data_type=value.type.tensor_type.elem_type)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            pad = -offset % 64
            data.write(bytes(pad))
            offset += pad
            if array.ndim == 0:
                data.write(array.tobytes())
            else:
                rows = max(1, _CHUNK // max(1, array[0].nbytes))
                for start in range(0, array.shape[0], rows):
                    data.write(np.ascontiguousarray(array[start : start + rows]).data)
            for key, item in (("location", target.name), ("offset", offset), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(item))
            offset += array.nbytes
            graph.initializer.append(tensor)
    del graph.input[:]
    graph.input.extend(kept)
    onnx.save(model, str(out))
