"""The graph TensorRT builds a decoder engine from: the exported (or quantized) generic graph, rewritten for serving.

    model = onnx.load(onnx_path, load_external_data=False)     # the graph only; weights stay where they are
    served, info = engine_graph(model, kv_dtype_for(precision))

Two changes, both on the graph alone (no weight is read or written):

* **logits for the last position only**: `logits` becomes [batch, 1, vocab]. A `Gather` of the last position on
  the sequence axis is put in front of the LM head's MatMul (found by walking back from `logits` through Casts to
  a MatMul by a constant weight), so neither the [batch, sequence, vocab] product nor its memory exists in the
  engine. Where no such MatMul is found the Gather is put on the output itself (same values, no compute saved).
  The scheduler's generic KV engine left-pads prompts, so the last column is every row's last token; it reads
  `logits[:, -1]`, which is this output's only column.
* **the KV cache IO in the compute dtype** (`kv_dtype_for`): FP16 for the fp16 and int4 variants, FP32 for fp32.
  Where the quantize stage's FP16 conversion kept FP32 IO (keep_io_types), its boundary Casts are removed: the
  cache goes in and out as the FP16 the graph computes with (exact). Where the graph computes in FP32 (int4:
  weight-only DequantizeLinear, FP32 activations), Casts at the cache boundary store it as FP16 (rounded).

Encoders are not rewritten. See docs/engines.md, "The graph TensorRT is given".
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..core.errors import BadInput
from ..core.profiles import Precision
from .metadata import EngineGraph

# Bumped whenever the rewrite changes what it produces: it is part of the engine stage's fingerprint.
SERVING_GRAPH_VERSION = 1

_ELEM = {"fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}
_PAST, _PRESENT, _LOGITS = "past_key_values.", "present.", "logits"
LAST_POSITION = "r1deploy.last_position"  # the Gather's index initializer: [-1]
# Ops between the LM head's MatMul and `logits` that act on each position alone (the Gather can move past them).
_POSITIONWISE = ("Cast", "Identity")
# Ops that only reshape, convert or dequantize a constant: a MatMul's weight through them is still a constant.
_CONSTANT_OPS = ("DequantizeLinear", "Cast", "Transpose", "Reshape", "Identity", "Constant")


def kv_dtype_for(precision: Precision | str) -> str:
    """The cache IO element type of a served engine (`Precision.engine_kv_dtype`)."""
    return Precision(precision).engine_kv_dtype


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input and output named `old` is named `new`."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known: IO, value_info, initializers; shape inference (on a copy
    without weight bytes) fills the rest when it can."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    produced = {o for n in g.node for o in n.output}
    if produced <= types.keys():
        return types
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for init in bare.graph.initializer:
        init.ClearField("raw_data")  # types and dims are all inference needs
    try:
        inferred = onnx.shape_inference.infer_shapes(bare).graph
    except Exception:  # an op inference does not know: the types found so far are all there is
        return types
    for v in inferred.value_info:
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    return types


def _cache_inputs(graph: onnx.GraphProto, target: int, types: dict[str, int]) -> None:
    consumers = _consumers(graph)
    for value in graph.input:
        if not value.name.startswith(_PAST) or value.type.tensor_type.elem_type == target:
            continue
        name, was = value.name, value.type.tensor_type.elem_type
        value.type.tensor_type.elem_type = target
        readers = consumers.get(name, [])
        for node in [n for n in readers if _cast_to(n) == target]:
            # keep_io_types' boundary Cast (graph FP32 → FP16 inside): with an FP16 input it is the identity
            graph.node.remove(node)
            _rename(graph, node.output[0], name)
        rest = [n for n in readers if _cast_to(n) != target]
        if rest:
            wide = f"{name}/as_{TensorProto.DataType.Name(was).lower()}"
            for node in rest:
                for i, x in enumerate(node.input):
                    if x == name:
                        node.input[i] = wide
            graph.node.insert(0, helper.make_node("Cast", [name], [wide], to=was, name=f"r1deploy/{wide}"))
            types[wide] = was


def _cache_outputs(graph: onnx.GraphProto, target: int, types: dict[str, int]) -> None:
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {v.name for v in graph.input}
    for value in graph.output:
        if not value.name.startswith(_PRESENT) or value.type.tensor_type.elem_type == target:
            continue
        name, was = value.name, value.type.tensor_type.elem_type
        value.type.tensor_type.elem_type = target
        node = producers[name]
        inner = node.input[0] if node.op_type == "Cast" else None
        if inner is not None and types.get(inner) == target and inner not in inputs:
            # keep_io_types' boundary Cast (FP16 inside → FP32 graph output): the output is the FP16 tensor itself
            graph.node.remove(node)
            _rename(graph, inner, name)
            continue
        wide = f"{name}/as_{TensorProto.DataType.Name(was).lower()}"
        _rename(graph, name, wide)
        graph.node.append(helper.make_node("Cast", [wide], [name], to=target, name=f"r1deploy/{name}/cast"))
        types[wide] = was


def _is_constant(name: str, initializers: set[str], producers: dict[str, onnx.NodeProto]) -> bool:
    if name in initializers:
        return True
    node = producers.get(name)
    if node is None or node.op_type not in _CONSTANT_OPS:
        return False
    return all(not x or _is_constant(x, initializers, producers) for x in node.input)


def _last_position(graph: onnx.GraphProto) -> str:
    """Gather the last position on the sequence axis in front of the LM head; returns where it was put."""
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    chain: set[str] = {_LOGITS}
    name = _LOGITS
    lm_head: onnx.NodeProto | None = None
    while name in producers:
        node = producers[name]
        if node.op_type in _POSITIONWISE:
            name = node.input[0]
            chain.add(name)
            continue
        if node.op_type == "MatMul" and _is_constant(node.input[1], initializers, producers):
            lm_head = node
        break
    graph.initializer.append(helper.make_tensor(LAST_POSITION, TensorProto.INT64, [1], [-1]))
    if lm_head is not None:
        hidden = lm_head.input[0]
        picked = f"{hidden}/last_position"
        lm_head.input[0] = picked
        index = list(graph.node).index(lm_head)
        graph.node.insert(index, helper.make_node("Gather", [hidden, LAST_POSITION], [picked], axis=1,
                                                  name="r1deploy/last_position"))
        where = f"lm_head input {hidden}"
    else:
        every = f"{_LOGITS}/all_positions"
        _rename(graph, _LOGITS, every)
        graph.node.append(helper.make_node("Gather", [every, LAST_POSITION], [_LOGITS], axis=1,
                                           name="r1deploy/last_position"))
        chain.add(every)
        where = "output"
    _drop_value_info(graph, chain)  # their sequence axis is now 1
    out = next(v for v in graph.output if v.name == _LOGITS)
    seq = out.type.tensor_type.shape.dim[1]
    seq.Clear()
    seq.dim_value = 1
    return where


def engine_graph(model: onnx.ModelProto, kv_dtype: str) -> tuple[onnx.ModelProto, EngineGraph]:
    """The serving form of a generic decoder graph (a copy; `model` is left as it is). `kv_dtype`: fp16 | fp32.
    Load `model` with `load_external_data=False`: external weights are referred to, never read."""
    if kv_dtype not in _ELEM:
        raise BadInput(f"KV-cache dtype {kv_dtype!r} is not one of {', '.join(_ELEM)}")
    names_in = {v.name for v in model.graph.input}
    names_out = {v.name for v in model.graph.output}
    if _LOGITS not in names_out or not any(n.startswith(_PAST) for n in names_in):
        raise BadInput("the serving graph is for decoders with a KV cache: this graph has no `logits` output or no "
                       "`past_key_values.*` inputs (build it with --engine-graph generic)")
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise BadInput("the serving graph rewrites the generic graph of standard ONNX ops; this one holds "
                       "non-standard ops (the fused ONNX Runtime graph?)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    target = _ELEM[kv_dtype]
    types = _elem_types(out)
    _cache_inputs(out.graph, target, types)
    _cache_outputs(out.graph, target, types)
    where = _last_position(out.graph)
    produced = {o for n in out.graph.node for o in n.output}
    _drop_value_info(out.graph, {v.name for v in out.graph.value_info} - produced)  # the removed Casts' tensors
    return out, EngineGraph("serving", "last", kv_dtype, where, SERVING_GRAPH_VERSION)


def generic_graph_info(model: onnx.ModelProto) -> EngineGraph:
    """What an unrewritten graph holds (a decoder's logits at every position, its cache IO type)."""
    past = next((v for v in model.graph.input if v.name.startswith(_PAST)), None)
    if past is None:
        return EngineGraph()
    kv = {TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}.get(past.type.tensor_type.elem_type, "")
    return EngineGraph("generic", "all", kv)


SERVING_FILE = "engine_graph.onnx"


def reproduce_command(onnx_path: Path, kv_dtype: str) -> list[str]:
    """The step before trtexec: write the serving graph beside `onnx_path` (where its external weights resolve:
    TensorRT's parser, like ONNX Runtime, refuses external-data paths that leave the model's directory)."""
    return ["python", "-m", "exporter.engine.serving_graph", f"--kv-dtype={kv_dtype}", str(onnx_path),
            str(serving_path(onnx_path))]


def serving_path(onnx_path: Path) -> Path:
    return Path(onnx_path).parent / SERVING_FILE


def write_serving_graph(onnx_path: Path, out_path: Path, kv_dtype: str) -> EngineGraph:
    """Read `onnx_path`'s graph (not its weights), write its serving form to `out_path`. `out_path` must lie in
    `onnx_path`'s directory when the weights are external (they are referred to by a path relative to it)."""
    src, out = Path(onnx_path), Path(out_path)
    model = onnx.load(str(src), load_external_data=False)
    external = any(i.data_location == TensorProto.EXTERNAL for i in model.graph.initializer)
    if external and out.resolve().parent != src.resolve().parent:
        raise BadInput(f"{src.name} keeps its weights in external data: write the serving graph into {src.parent}, "
                       "where they resolve")
    served, info = engine_graph(model, kv_dtype)
    out.write_bytes(served.SerializeToString())
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m exporter.engine.serving_graph",
                                 description="Write the graph r1deploy's engine stage hands TensorRT for a decoder.")
    ap.add_argument("--kv-dtype", choices=sorted(_ELEM), required=True)
    ap.add_argument("onnx", help="the ONNX variant (model.onnx)")
    ap.add_argument("out", nargs="?", help=f"where to write it [default: {SERVING_FILE} beside the ONNX]")
    args = ap.parse_args(argv)
    try:
        info = write_serving_graph(args.onnx, args.out or serving_path(args.onnx), args.kv_dtype)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"logits: {info.logits} position ({info.logits_gather}); KV cache IO: {info.kv_dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
