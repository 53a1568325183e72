"""Where the weights are in an exported graph, and the two ways of writing them back as INT4.

Targets (`find_targets`):

* `matmul` / `lm_head` — a 2-D float initializer read as MatMul's B input `[K, N]`: blocks along K (axis 0).
* `expert` — a 3-D MoE expert bank `[E, ·, ·]` read through Gather/GatherND (one expert per routed token) and fed
  to a batched MatMul; the reduction axis is the last one when the gathered weight is MatMul's A input
  (`W[e] @ x`, what DeepseekV3's `batched_mm` exports) and the middle one when it is B.
* `embedding` — a 2-D table read through Gather: blocks along the hidden axis (axis 1).

Formats (`write_int4`):

* `qdq`: `DequantizeLinear(INT4/UINT4 codes, scales[, zero points], axis, block_size)` (opset 21) whose output
  takes the original initializer's name, so every consumer is unchanged. Standard ops only: what TensorRT reads
  in a strongly typed network and what `onnx.checker` validates.
* `ort`: 2-D MatMul weights become `com.microsoft.MatMulNBits` (ONNX Runtime's fused 4-bit kernel). It has no
  form for gathered 3-D expert banks or embedding tables, so those keep the standard DequantizeLinear form,
  which ONNX Runtime also runs.

AWQ's per-channel activation scale becomes `Mul(activation, 1/s)` in front of the MatMul.
"""

from __future__ import annotations

import ast
import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .core import QuantizedWeight, pack_nibbles

MS_DOMAIN = "com.microsoft"
AWQ_SUFFIX = "_awq_inv_scale"


@dataclass(frozen=True)
class WeightTarget:
    weight: str  # initializer name
    layer: str  # module path from the exporter's metadata (model.layers.0.self_attn.q_proj), else node name
    kind: str  # matmul | lm_head | expert | embedding
    node: str  # the consuming MatMul / Gather node
    axis: int  # reduction axis in the weight's own layout: the blocks lie along it
    shape: tuple[int, ...]
    activation: Optional[str] = None  # MatMul's activation input: calibration capture and AWQ's Mul

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            out[name].append((node, i))
    return out


def _module_path(node: onnx.NodeProto) -> Optional[str]:
    """The innermost torch module the node came from (dynamo exporter metadata), without the wrapper's prefix."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes[:-1] if s]  # the last entry is the op itself ("linear", "index_1")
    if not modules:
        return None
    path = modules[-1]
    return path.split(".", 1)[1] if path.startswith("model.") else path


def _param_name(node: onnx.NodeProto) -> Optional[str]:
    """The torch parameter a node reads (`%p_model_..._gate_up_proj`), for naming expert banks."""
    meta = {p.key: p.value for p in node.metadata_props}
    fx = meta.get("pkg.torch.onnx.fx_node", "")
    start = fx.find("(%p_")
    if start < 0:
        return None
    end = min((i for i in (fx.find(",", start), fx.find(")", start + 1)) if i > 0), default=-1)
    return fx[start + 2 : end] if end > 0 else None


def find_targets(model: onnx.ModelProto, vocab_size: Optional[int] = None) -> list[WeightTarget]:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    consumers = _consumers(graph)
    found: list[WeightTarget] = []
    for name, init in inits.items():
        uses = consumers.get(name, [])
        if len(uses) != 1:  # shared (tied) weights would need one quantization for several readers
            continue
        node, slot = uses[0]
        shape = tuple(int(d) for d in init.dims)
        layer = _module_path(node) or node.name
        if node.op_type == "MatMul" and slot == 1 and len(shape) == 2:
            # The output projection: named lm_head by transformers, or any MatMul onto the vocabulary.
            is_head = layer.endswith("lm_head") or shape[1] == vocab_size
            found.append(WeightTarget(name, layer, "lm_head" if is_head else "matmul", node.name, 0, shape, node.input[0]))
        elif node.op_type in ("Gather", "GatherND") and slot == 0 and len(shape) == 3:
            axis_attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if axis_attr.get("axis", 0) != 0 or axis_attr.get("batch_dims", 0) != 0:
                continue
            readers = consumers.get(node.output[0], [])
            if not readers or any(r.op_type != "MatMul" for r, _ in readers):
                continue
            slots = {s for _, s in readers}
            if len(slots) != 1:
                continue
            # Gathered W[e] is [·, ·]: as MatMul's A the sum runs over its last axis, as B over its first.
            axis = 2 if slots == {0} else 1
            param = _param_name(node)
            if param and layer:
                prefix = "p_model_" + layer.replace(".", "_") + "_"
                if param.startswith(prefix):
                    layer = f"{layer}.{param[len(prefix):]}"
            act = readers[0][0].input[1 - readers[0][1]]
            found.append(WeightTarget(name, layer, "expert", node.name, axis, shape, act))
        elif node.op_type == "Gather" and slot == 0 and len(shape) == 2:
            axis_attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if axis_attr.get("axis", 0) == 0:
                found.append(WeightTarget(name, layer, "embedding", node.name, 1, shape))
    # Module paths repeat when one module holds several weights; keep names unique for reports.
    seen: dict[str, int] = defaultdict(int)
    for t in found:
        seen[t.layer] += 1
    return [t if seen[t.layer] == 1 else WeightTarget(**{**t.__dict__, "layer": f"{t.layer}[{t.weight}]"}) for t in found]


def _int4_tensor(name: str, codes: np.ndarray, signed: bool) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(codes.shape), pack_nibbles(codes), raw=True)


def _dq_nodes(t: WeightTarget, qw: QuantizedWeight) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Standard blocked DequantizeLinear producing the original initializer name."""
    inits = [_int4_tensor(f"{t.weight}_q4", qw.q, qw.symmetric), numpy_helper.from_array(qw.scales.astype(np.float32), f"{t.weight}_scale")]
    inputs = [f"{t.weight}_q4", f"{t.weight}_scale"]
    if qw.zero_points is not None:
        inits.append(_int4_tensor(f"{t.weight}_zp", qw.zero_points, signed=False))
        inputs.append(f"{t.weight}_zp")
    node = helper.make_node(
        "DequantizeLinear", inputs, [t.weight], name=f"{t.node}_dq4", axis=qw.axis, block_size=qw.block_size
    )
    return [node], inits


def _matmulnbits(t: WeightTarget, qw: QuantizedWeight, node: onnx.NodeProto, act: str) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """MatMulNBits: B uint8 [N, n_blocks, block_size/2] (column n's blocks, low nibble first), scales
    [N·n_blocks], zero points uint8 [N, ceil(n_blocks/2)] packed; omitted zero points mean 8."""
    k, n = t.shape
    nb = qw.scales.shape[0]
    codes = qw.q.astype(np.int16) + (8 if qw.symmetric else 0)  # unsigned storage
    b = np.frombuffer(pack_nibbles(codes.T.reshape(n, nb, qw.block_size)), np.uint8).reshape(n, nb, qw.block_size // 2)
    inits = [
        numpy_helper.from_array(b, f"{t.weight}_nbits"),
        numpy_helper.from_array(np.ascontiguousarray(qw.scales.T).reshape(-1).astype(np.float32), f"{t.weight}_scale"),
    ]
    inputs = [act, f"{t.weight}_nbits", f"{t.weight}_scale"]
    if qw.zero_points is not None:
        zp = np.zeros((n, nb + nb % 2), dtype=np.uint8)
        zp[:, :nb] = qw.zero_points.T
        packed = np.frombuffer(pack_nibbles(zp), np.uint8).reshape(n, -1)
        inits.append(numpy_helper.from_array(packed, f"{t.weight}_zp"))
        inputs.append(f"{t.weight}_zp")
    new = helper.make_node(
        "MatMulNBits", inputs, list(node.output), name=f"{node.name}_nbits", domain=MS_DOMAIN,
        K=k, N=n, bits=4, block_size=qw.block_size,
    )
    return new, inits


def int4_replacement(
    node: onnx.NodeProto, t: WeightTarget, qw: QuantizedWeight, fmt: str
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], list[TensorProto]]:
    """What one quantized weight becomes in `fmt` (qdq | ort): nodes that go before every other node (the
    DequantizeLinear that produces the original weight name), the nodes that take `node`'s place (`node` itself,
    possibly reading the AWQ-scaled activation, or its MatMulNBits), and the new initializers. `node` is edited in
    place when it is kept. One weight at a time, so a writer can put each one's bytes on disk before the next
    (exporter.stream_build); `write_int4` is this over a whole graph."""
    head: list[onnx.NodeProto] = []
    body: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    act = node.input[0] if t.kind in ("matmul", "lm_head") else None
    if qw.input_scale is not None and act is not None:
        # AWQ: x · diag(1/s) feeds the weight quantized as diag(s)·W — the product is unchanged.
        inv = t.weight + AWQ_SUFFIX
        inits.append(numpy_helper.from_array((1.0 / qw.input_scale).astype(np.float32), inv))
        scaled = f"{act}_awq_{t.weight}"
        body.append(helper.make_node("Mul", [act, inv], [scaled], name=f"{node.name}_awq_scale"))
        act = scaled
    if fmt == "ort" and act is not None:
        new, nbits = _matmulnbits(t, qw, node, act)
        return head, [*body, new], inits + nbits
    dq, dq_inits = _dq_nodes(t, qw)
    head.extend(dq)
    if act is not None and act != node.input[0]:
        node.input[0] = act
    body.append(node)
    return head, body, inits + dq_inits


def write_int4(
    base: onnx.ModelProto, quantized: dict[str, tuple[WeightTarget, QuantizedWeight]], fmt: str
) -> onnx.ModelProto:
    """A copy of `base` with the given weights replaced by their INT4 form (`fmt`: qdq | ort)."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    kept = [i for i in graph.initializer if i.name not in quantized]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    by_node = {t.node: (t, qw) for t, qw in quantized.values()}
    head: list[onnx.NodeProto] = []
    body: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in by_node:
            body.append(node)
            continue
        t, qw = by_node[node.name]
        h, b, inits = int4_replacement(node, t, qw, fmt)
        head.extend(h)
        body.extend(b)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(head + body)
    ensure_ms_opset(model)
    return model


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft domain when a MatMulNBits was written into a graph that had none."""
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def write_probe(
    base: onnx.ModelProto, quantized: dict[str, tuple[WeightTarget, QuantizedWeight]]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """One graph in which every quantized weight can be switched on or off at run time, for the mixed-precision
    search: `W_used = W + g · (Ŵ − W)` with `g` a scalar graph input (0 → FP32, 1 → INT4 as written, AWQ scale
    folded into Ŵ). One session then measures any subset of quantized layers without rebuilding the model.
    Returns the graph and weight name → gate input name."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    gates: dict[str, str] = {}
    head: list[onnx.NodeProto] = []
    for init in g.initializer:
        if init.name not in quantized:
            continue
        name = init.name
        _, qw = quantized[name]
        w = numpy_helper.to_array(init)
        init.name = f"{name}_fp32"
        g.initializer.append(numpy_helper.from_array((qw.dequantize() - w).astype(np.float32), f"{name}_delta"))
        gates[name] = f"{name}_gate"
        g.input.append(helper.make_tensor_value_info(gates[name], TensorProto.FLOAT, []))
        head.append(helper.make_node("Mul", [f"{name}_delta", gates[name]], [f"{name}_scaled_delta"]))
        head.append(helper.make_node("Add", [f"{name}_fp32", f"{name}_scaled_delta"], [name]))
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model, gates


def _shape_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """`onnx.shape_inference.infer_shapes(model)` without a second copy of the weights: inference runs on the graph
    with its large float initializers emptied (shapes come from their dims; their values decide no shape), and the
    weights are moved, one tensor at a time, into the inferred model. `model` is left without them."""
    stash: dict[str, bytes] = {}
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16) and len(init.raw_data) > 4096:
            stash[init.name] = init.raw_data
            init.ClearField("raw_data")
    inferred = onnx.shape_inference.infer_shapes(model)
    for init in inferred.graph.initializer:
        data = stash.pop(init.name, None)
        if data is not None:
            init.raw_data = data
    assert not stash, f"shape inference dropped initializers: {sorted(stash)[:3]}"
    return inferred


def to_fp16(model: onnx.ModelProto, keep_io_fp32: bool, kv_cache_fp16: bool = False) -> onnx.ModelProto:
    """Whole-graph FP16 with the numerically fragile parts left in FP32.

    `model` is consumed: its weights move into the result (ONNX Runtime's converter, given a model, makes a full
    copy to infer shapes — at R1-Distill-Qwen-1.5B's size two more copies of 6.6 GiB of FP32 weights than needed).

    FP16 tops out at 65504: squares and means of hidden states (RMSNorm/LayerNorm statistics), exponentials
    (Softmax, Exp) and rotary angles (position × frequency lose integer precision above 2048) overflow or
    round badly. Those ops, the normalisation chain after a reduction (eps Add, Sqrt, Reciprocal, Div) and
    everything that computes the rotary Cos/Sin stay FP32; ONNX Runtime's converter adds the Casts.

    `kv_cache_fp16` (the fused graph): the KV cache inputs and outputs become FP16 even when the other IO stays
    FP32 — a Cast between the caller's buffer and GroupQueryAttention would be a copy of the whole cache per step
    and would break the in-place update. The fused graph's rotary tables are precomputed in float64 and rounded
    once, so they need no FP32 cone.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    fragile_ops = {
        "Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMax", "Sqrt", "Reciprocal",
        "Softmax", "LogSoftmax", "Exp", "Log", "Erf", "LayerNormalization", "RMSNormalization",
        "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
        "Cos", "Sin",
    }
    # A norm exported as a local function is called as an op named after it.
    fragile_ops |= {f.name for f in model.functions if "norm" in f.name.lower()}
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    blocked_nodes: set[str] = set()
    reductions = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"}
    for node in graph.node:
        if node.op_type in reductions:
            # eps Add → Sqrt → Reciprocal/Div: the statistic is only safe to narrow once normalised.
            frontier = list(node.output)
            while frontier:
                for reader, _ in consumers.get(frontier.pop(), []):
                    if reader.op_type in ("Add", "Sqrt", "Reciprocal", "Div", "Clip", "Max") and reader.name not in blocked_nodes:
                        blocked_nodes.add(reader.name)
                        frontier.extend(reader.output)
        if node.op_type in ("Cos", "Sin"):
            # The rotary angle cone: position ids → Cast → MatMul with inv_freq → Cos/Sin.
            stack = list(node.input)
            while stack:
                prod = producers.get(stack.pop())
                if prod is not None and prod.name not in blocked_nodes:
                    blocked_nodes.add(prod.name)
                    stack.extend(prod.input)
    keep_io: bool | list[str] = keep_io_fp32
    if kv_cache_fp16 and keep_io_fp32:
        keep_io = [v.name for v in [*graph.input, *graph.output]
                   if not v.name.startswith(("past_key_values.", "present."))]
    return convert_float_to_float16(
        _shape_inferred(model),
        disable_shape_infer=True,  # done above, on the graph without its weights
        keep_io_types=keep_io,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | fragile_ops),
        node_block_list=sorted(blocked_nodes),
    )


@contextlib.contextmanager
def _value_info_from_dims():
    """ONNX Runtime's converter reads a whole initializer (`numpy_helper.to_array`) only to learn its shape; the
    shape is its dims. Within this block it reads the dims, so it can run on a graph whose weights are not loaded."""
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def to_fp16_from_file(path: Path, keep_io_fp32: bool, kv_cache_fp16: bool = False) -> onnx.ModelProto:
    """`to_fp16` of the model at `path`, whose weights in external data are read one tensor at a time, after the
    graph is converted, and narrowed as the converter narrows them. Nothing holds the FP32 weights at once: the
    result holds the FP16 ones (half), where loading the model first held the FP32 weights and, in protobuf's
    arena, every replaced copy too (a 1.5B model's 6.6 GiB grew past 19 GiB). The same bytes as
    `to_fp16(onnx.load(path))` (tests/test_quantize.py)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    model = onnx.load(str(path), load_external_data=False)
    stored: dict[str, tuple[int, Path, int, int]] = {}
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            stored[init.name] = (init.data_type, path.parent / info["location"], int(info.get("offset", 0)),
                                 int(info.get("length", -1)))
            del init.external_data[:]
            init.data_location = TensorProto.DEFAULT
    with _value_info_from_dims():
        converted = to_fp16(model, keep_io_fp32, kv_cache_fp16)
    for init in converted.graph.initializer:
        if init.name not in stored:
            continue
        data_type, file, offset, length = stored.pop(init.name)
        with open(file, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if data_type == TensorProto.FLOAT and init.data_type == TensorProto.FLOAT16:
            data = convert_np_to_float16(np.frombuffer(data, dtype=np.float32)).tobytes()
        init.raw_data = data
    if stored:
        raise ValueError(f"the FP16 conversion dropped initializers: {sorted(stored)[:3]}")
    return converted

