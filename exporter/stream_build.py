"""The fused decoder graph built straight from a checkpoint's safetensors shards to FP32, FP16 or INT4, in bounded
memory: the path for real sizes (Qwen2 / Llama).

`export --graph fused` + `quantize --graph fused` write the FP32 graph, then load it whole (INT4: the FP32 weights,
every quantized copy and a rewritten proto; at R1-Distill-Qwen-1.5B's shape that passed 18 GiB). Here the graph is
the one `exporter.fused_graph` writes — the same nodes, names and conventions — and each weight goes from the shard
to `model.onnx.data` on its own, converted on the way:

* `fp32`: as read (bf16 widened exactly);
* `fp16`: the graph is converted first, without its weights, by the quantize stage's own converter
  (`quantize.rewrite.to_fp16`: the same Casts, the same FP32 ops, KV cache FP16); then each weight is narrowed as
  that converter narrows it. The same bytes as `quantize --graph fused --precision fp16` (tests/test_stream_build.py);
* `int4` RTN: the quantize stage's targets (`choose_targets`), its quantizer (`quantize.core`) and its writer, one
  weight at a time (`rewrite.int4_replacement`): the same initializers as the stage writes;
* `int4` AWQ: calibrated layer by layer. The calibration sentences' hidden states are carried from one layer to the
  next in numpy, the big products in torch (FP32, the fused graph's arithmetic: RMSNorm, rotary from the same
  tables, causal GQA, SwiGLU), so only one layer's weights and one layer's activations are held. The activations are those of the FP32 model, as the
  stage captures them from the FP32 graph; they agree with ONNX Runtime's to float rounding, so AWQ's searches can
  pick a neighbouring grid point on a few weights (tests compare the accuracies, not the bytes).

Peak memory: one layer's FP32 weights (AWQ) or one weight (otherwise) and its quantization temporaries, plus the
graph without weights; the largest single tensor (the embedding / lm_head table) is converted in row blocks.
Accuracy (fp16 / int4): measured on the way against the checkpoint's FP32 weights, layer by layer, on the quantize
stage's held-out sentences with the stage's own figures (`_Evaluation`), and gated when asked; the quantize stage's
other work — keeping sensitive layers FP32 (mixed precision) — is not done here. DeepseekV3 is refused (its MLA has
no fused kernel: it keeps the generic path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto

from . import fused_graph
from .core import artifacts
from .core.errors import BadInput, StageFailed
from .core.profiles import AccuracyGate
from .core.typed import to_data

_ALIGN = 64  # ONNX Runtime maps 64-byte aligned external data without copying
_BLOCK_BYTES = 1 << 26  # row blocks of the big tables (embedding, lm_head): 64 MiB of FP32 at a time


@dataclass(frozen=True)
class StreamConfig:
    """What to write. INT4 settings default to the quantize stage's (exporter.core.profiles.QuantSpec)."""

    precision: str = "fp32"  # fp32 | fp16 | int4
    method: str = "awq"  # int4: rtn | awq
    block_size: int = 128
    format: str = "qdq"  # int4: qdq | ort
    symmetric: bool = True
    quantize_lm_head: bool = False
    calibration_sentences: Optional[int] = None  # AWQ: the first N of quantize.sentences.CALIBRATION (None: all)
    evaluate: bool = True  # fp16 / int4: measure the accuracy of what is written, layer by layer (_Evaluation)
    gate: Optional[AccuracyGate] = None  # refuse the result below these figures (a deployment profile's gate)
    # Texts measured besides the held-out sentences, by name (the embedded preset's: exporter.tiny_models), reported
    extra_texts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int4"):
            raise BadInput(f"precision must be fp32, fp16 or int4, got {self.precision!r}")
        if self.method not in ("rtn", "awq"):
            raise BadInput(f"method must be rtn or awq, got {self.method!r}")
        if self.format not in ("qdq", "ort"):
            raise BadInput(f"format must be qdq or ort, got {self.format!r}")


@dataclass
class StreamResult:
    onnx_path: Path
    precision: str
    layers: int
    tensors_written: int
    data_bytes: int  # model.onnx.data
    graph_bytes: int  # model.onnx (the graph without weights)
    seconds: float
    quantized: list[str] = field(default_factory=list)  # weight names written as INT4
    awq_alpha: dict[str, float] = field(default_factory=dict)
    evaluation: str = "skipped"  # ok | skipped: <why>
    accuracy: dict[str, float] = field(default_factory=dict)  # against the checkpoint's FP32 weights (_Evaluation)
    accuracy_by_text: dict[str, dict[str, float]] = field(default_factory=dict)  # held_out (= accuracy) + extra texts
    int4_layers: list[dict] = field(default_factory=list)  # per quantized weight: layer, kind, shape, alpha, error
    not_quantized: list[dict] = field(default_factory=list)  # weights left FP32, with the reason
    int4_weight_bytes: int = 0  # codes, scales and zero points of the quantized weights
    awq_scale_bytes: int = 0  # AWQ's 1/s vectors
    quantized_values: int = 0  # weight values stored in 4 bits
    evaluation_seconds: float = 0.0
    gate: Optional[AccuracyGate] = None
    report_path: Optional[Path] = None


class _DataFile:
    """model.onnx.data, appended to one tensor at a time; each initializer gets its external-data reference."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "wb")
        self.offset = 0
        self.count = 0

    def _start(self) -> int:
        pad = -self.offset % _ALIGN
        self.fh.write(bytes(pad))
        self.offset += pad
        return self.offset

    def _finish(self, tensor: TensorProto, start: int) -> None:
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", start), ("length", self.offset - start)):
            tensor.external_data.add(key=key, value=str(value))
        self.count += 1

    def write(self, tensor: TensorProto, data: bytes | np.ndarray) -> None:
        start = self._start()
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        self.fh.write(buf)
        self.offset += len(buf)
        self._finish(tensor, start)

    def write_blocks(self, tensor: TensorProto, blocks) -> None:
        start = self._start()
        for block in blocks:
            buf = memoryview(np.ascontiguousarray(block)).cast("B")
            self.fh.write(buf)
            self.offset += len(buf)
        self._finish(tensor, start)

    def externalise(self, tensor: TensorProto) -> TensorProto:
        """A tensor built in memory (INT4 codes, scales): its bytes to the file; returns a new header that refers to
        them. Not the same proto with its data cleared: protobuf keeps a cleared field's bytes in the message's
        arena for as long as the message lives, and the headers live until the graph is saved — at 7B that kept
        every quantized weight in memory (peak 4.8 GiB, growing with the output)."""
        data = tensor.raw_data if tensor.raw_data else onnx.numpy_helper.to_array(tensor)
        header = TensorProto(name=tensor.name, dims=list(tensor.dims), data_type=tensor.data_type)
        self.write(header, data)
        return header

    def close(self) -> None:
        self.fh.close()


def _bf16_rows_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _table_blocks(w: fused_graph._Weights, name: str, transpose: bool, narrow):
    """Row blocks of a big table (the embedding [vocab, h] or lm_head's [h, vocab]), converted per block: the raw
    tensor (bf16: 2 bytes a value) is the only whole copy held."""
    raw, dtype = w.raw(name)
    to_f32 = _bf16_rows_to_f32 if dtype == "BF16" else (lambda a: a.astype(np.float32))
    src = raw.T if transpose else raw
    rows = max(1, _BLOCK_BYTES // (4 * src.shape[1]))
    for start in range(0, src.shape[0], rows):
        yield narrow(to_f32(np.ascontiguousarray(src[start : start + rows])))


_FP16_TINY, _FP16_MAX = np.float32(5.96e-08), np.float32(65504.0)


def _fp16(a: np.ndarray) -> np.ndarray:
    """ONNX Runtime's `convert_np_to_float16` (what the quantize stage narrows weights with), without its work
    that changes nothing: it indexes every positive and negative value only to log their range, and copies the
    array once per clamp. Same clamps — non-zero magnitudes below 5.96e-8 to ±5.96e-8, finite ones above 65504 to
    ±65504 — then the same rounding; the same bytes (tests/test_stream_build.py), several times faster."""
    a = np.array(a, dtype=np.float32, copy=True)
    a[(a > 0) & (a < _FP16_TINY)] = _FP16_TINY
    a[(a < 0) & (a > -_FP16_TINY)] = -_FP16_TINY
    a[(a > _FP16_MAX) & (a < np.inf)] = _FP16_MAX
    a[(a < -_FP16_MAX) & (a > -np.inf)] = -_FP16_MAX
    return a.astype(np.float16)


def stream_build(checkpoint: Path, out_dir: Path, cfg: StreamConfig = StreamConfig()) -> StreamResult:
    """Write `out_dir/model.onnx` + `model.onnx.data` for a Qwen2 / Llama checkpoint directory (safetensors, one
    file or a sharded index) at `cfg`'s precision, and `stream_report.json` with its accuracy (gated by
    `cfg.gate`: below it the model is removed and the report kept as `stream_report.rejected.json`). `out_dir` must
    not hold a model yet."""
    result = build(checkpoint, out_dir, cfg)
    try:
        _report(out_dir, result, cfg, Path(checkpoint))
    except BaseException:
        for path in (out_dir / "model.onnx", out_dir / "model.onnx.data"):
            path.unlink(missing_ok=True)
        raise
    return result


def build(checkpoint: Path, out_dir: Path, cfg: StreamConfig = StreamConfig()) -> StreamResult:
    """The model alone (`model.onnx` + `model.onnx.data`), its accuracy measured (`cfg.evaluate`) but not gated, no
    report: what `stream_build` and the quantize stage's streamed variants (exporter.quantize_fused) write."""
    started = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "config.json").is_file():
        raise BadInput(f"{checkpoint} is not a checkpoint directory (no config.json)")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    if out.exists() or (out_dir / "model.onnx.data").exists():
        raise BadInput(f"{out_dir} already holds a model: build into an empty directory")
    model, lazy, spec, weights = fused_graph.graph_without_weights(checkpoint)
    # The weight inputs become initializers without data: the converters below read only their type and dims.
    graph = model.graph
    headers: dict[str, TensorProto] = {}
    kept_inputs = []
    for value in graph.input:
        if value.name in lazy:
            shape, _ = lazy[value.name]
            headers[value.name] = TensorProto(name=value.name, dims=list(shape), data_type=TensorProto.FLOAT)
        else:
            kept_inputs.append(value)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.initializer.extend(headers.values())
    result = StreamResult(out, cfg.precision, spec.layers, 0, 0, 0, 0.0, gate=cfg.gate)
    data = _DataFile(out_dir / "model.onnx.data")
    written = [data.path, out]
    if cfg.precision == "fp32":
        result.evaluation = "skipped: fp32 writes the checkpoint's weights as read"
    elif not cfg.evaluate:
        result.evaluation = "skipped: --no-evaluate"
    try:
        if cfg.precision == "int4":
            model = _write_int4(model, lazy, weights, spec, checkpoint, cfg, data, result)
        else:
            if cfg.precision == "fp16":
                from quantize import rewrite

                with rewrite._value_info_from_dims():  # the converter reads dims, never the (absent) values
                    model = rewrite.to_fp16(model, keep_io_fp32=True, kv_cache_fp16=True)
            for init in model.graph.initializer:
                if init.name in lazy:
                    narrow = _fp16 if init.data_type == TensorProto.FLOAT16 else (lambda a: a)
                    _write_weight(data, init, lazy, weights, narrow)
            if cfg.precision == "fp16" and cfg.evaluate:
                _evaluate_fp16(model, lazy, weights, spec, checkpoint, cfg, result)
        data.close()
        onnx.save(model, str(out))
        result.tensors_written = data.count
        result.data_bytes = data.offset
        result.graph_bytes = out.stat().st_size
        result.seconds = round(time.perf_counter() - started, 3)
    except BaseException:
        data.close()
        for path in written:  # no half-written model left behind (a re-run would refuse the directory)
            path.unlink(missing_ok=True)
        raise
    return result


REPORT = "stream_report.json"


def _report(out_dir: Path, result: StreamResult, cfg: StreamConfig, checkpoint: Path) -> None:
    """stream_report.json beside the model; below the gate, the model is removed and the report is kept as
    stream_report.rejected.json (the figures that failed), and the build fails."""
    from quantize.stage import gate_failure

    report = {
        "checkpoint": str(checkpoint),
        "settings": {k: v for k, v in to_data(cfg).items() if k not in ("gate", "extra_texts")},
        "onnx": result.onnx_path.name,
        "layers": result.layers,
        "tensors_written": result.tensors_written,
        "data_bytes": result.data_bytes,
        "graph_bytes": result.graph_bytes,
        "quantized": len(result.quantized),
        "awq_alpha": result.awq_alpha,
        "evaluation": result.evaluation,
        "accuracy": result.accuracy,
        "accuracy_by_text": result.accuracy_by_text,
        "evaluation_seconds": result.evaluation_seconds,
        "gate": to_data(cfg.gate) if cfg.gate else None,
        "definitions": (_Evaluation.__doc__ or "").strip(),
        "seconds": result.seconds,
    }
    failure = gate_failure(cfg.gate, result.accuracy, "decoder", "--min-cosine/--min-top1 or --profile") \
        if result.accuracy else None
    rejected = out_dir / REPORT.replace(".json", ".rejected.json")
    if failure:
        artifacts.write_json(rejected, report)
        raise StageFailed(f"{cfg.precision} build of {checkpoint.name} rejected: {failure}; report: {rejected}")
    if cfg.gate and not result.accuracy:
        raise BadInput(f"an accuracy gate needs the evaluation ({result.evaluation}): drop the gate or the --no-evaluate")
    result.report_path = out_dir / REPORT
    artifacts.write_json(result.report_path, report)
    rejected.unlink(missing_ok=True)


def _evaluation(checkpoint: Path, spec, lazy: dict, w, narrowed: set[str], cfg: StreamConfig,
                result: StreamResult) -> Optional[_Evaluation]:
    """The evaluation, or None with `result.evaluation` saying why it is skipped (a checkpoint without a tokenizer;
    refused when a gate asks for the figures)."""
    try:
        return _Evaluation(checkpoint, spec, lazy, w, narrowed, cfg.extra_texts)
    except BadInput as exc:
        if cfg.gate:
            raise BadInput(f"{exc.message}: the accuracy gate cannot be checked") from None
        result.evaluation = f"skipped: {exc.message}"
        return None


def _evaluate_fp16(model: onnx.ModelProto, lazy: dict, w, spec, checkpoint: Path, cfg: StreamConfig,
                   result: StreamResult) -> None:
    t0 = time.perf_counter()
    narrowed = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    evaluation = _evaluation(checkpoint, spec, lazy, w, narrowed, cfg, result)
    if evaluation is None:
        return

    def reference(name: str) -> np.ndarray:
        return np.asarray(lazy[name][1](), np.float32)

    def candidate(name: str) -> np.ndarray:
        return evaluation._narrow(name, reference(name))

    for i in range(spec.layers):
        evaluation.layer(i, reference, candidate)
    result.accuracy_by_text = evaluation.finish()
    result.accuracy = result.accuracy_by_text["held_out"]
    result.evaluation = "ok"
    result.evaluation_seconds = round(time.perf_counter() - t0, 3)


def _write_weight(data: _DataFile, init: TensorProto, lazy: dict, w: fused_graph._Weights, narrow) -> None:
    shape, load = lazy[init.name]
    table = {"model.embed_tokens.weight": ("model.embed_tokens.weight", False)}
    if init.name == "lm_head.weight_t":
        head = "lm_head.weight" if w.has("lm_head.weight") else "model.embed_tokens.weight"
        table["lm_head.weight_t"] = (head, True)
    if init.name in table:
        src, transpose = table[init.name]
        got = tuple(w.shape(src)[::-1] if transpose else w.shape(src))
        if got != tuple(shape):
            raise BadInput(f"checkpoint tensor {src} has shape {list(w.shape(src))}, config.json implies {list(shape)}")
        data.write_blocks(init, _table_blocks(w, src, transpose, narrow))
        return
    arr = np.asarray(load(), dtype=np.float32)
    if tuple(arr.shape) != tuple(shape):
        raise BadInput(f"checkpoint tensor {init.name} has shape {list(arr.shape)}, config.json implies {list(shape)}")
    data.write(init, narrow(arr))


def _write_int4(model: onnx.ModelProto, lazy: dict, w, spec, checkpoint: Path, cfg: StreamConfig, data: _DataFile,
                result: StreamResult) -> onnx.ModelProto:
    from quantize import core, rewrite
    from quantize.config import QuantizeConfig
    from quantize.stage import choose_targets, resolve

    settings = resolve(QuantizeConfig(precision="int4", method=cfg.method, block_size=cfg.block_size,
                                      format=cfg.format, symmetric=cfg.symmetric, quantize_lm_head=cfg.quantize_lm_head,
                                      graph="fused"))
    chosen, result.not_quantized = choose_targets(rewrite.find_targets(model, spec.vocab), settings)
    if not chosen:
        raise BadInput(f"no weight of {checkpoint} can be quantized with block size {cfg.block_size}")
    by_node = {t.node: t for t in chosen}
    graph = model.graph
    target_weights = {t.weight for t in chosen}
    calib = _Calibration(checkpoint, spec, lazy, w, cfg) if cfg.method == "awq" else None
    evaluation = _evaluation(checkpoint, spec, lazy, w, set(), cfg, result) if cfg.evaluate else None
    layer_qw: dict[str, core.QuantizedWeight] = {}  # the open layer's quantized weights, for the evaluation
    evaluated = 0  # layers both forwards have passed
    eval_seconds = 0.0

    def evaluate_upto(end: int, fp32: dict[str, np.ndarray]) -> None:
        """Both forwards through layers [evaluated, end): the last of them with `layer_qw` (and `fp32`, its FP32
        MatMul weights when held), any before it that had no quantized weight with the checkpoint's weights."""
        nonlocal evaluated, eval_seconds
        t0 = time.perf_counter()
        while evaluation is not None and evaluated < end:
            held = fp32 if evaluated == end - 1 else {}
            qws = layer_qw if evaluated == end - 1 else {}

            def reference(name: str, held=held) -> np.ndarray:
                return held[name] if name in held else np.asarray(lazy[name][1](), np.float32)

            def candidate(name: str, qws=qws, reference=reference) -> np.ndarray:
                return qws[name].dequantize() if name in qws else reference(name)

            evaluation.layer(evaluated, reference, candidate)
            evaluated += 1
        eval_seconds += time.perf_counter() - t0
    # FP32 weights that stay FP32 (norms, embedding, lm_head, rotary tables) go first, one at a time.
    for init in graph.initializer:
        if init.name in lazy and init.name not in target_weights:
            _write_weight(data, init, lazy, w, lambda a: a)
    head: list[onnx.NodeProto] = []
    body: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    layer_weights: dict[str, np.ndarray] = {}
    current_layer = None
    for node in graph.node:
        t = by_node.get(node.name)
        if t is None:
            body.append(node)
            continue
        layer = _layer_of(t.weight)
        if layer != current_layer:  # one layer's weights and activations at a time
            if current_layer is not None:
                evaluate_upto(current_layer + 1, layer_weights)
                layer_qw.clear()
            current_layer, layer_weights = layer, {}
            if calib is not None and layer is not None:
                layer_weights = calib.advance(layer)
            elif calib is not None and t.kind == "lm_head":
                calib.finish()
        wt = layer_weights.get(t.weight)
        if wt is None:
            wt = np.asarray(lazy[t.weight][1](), dtype=np.float32)
        x = calib.acts.get(t.activation) if calib is not None and t.activation else None
        if cfg.method == "awq" and x is not None:
            qw = core.quantize_awq(wt, x, cfg.block_size, cfg.symmetric)
        elif cfg.method == "awq":
            qw = core.quantize_clipped(wt, t.axis, cfg.block_size, cfg.symmetric)
        else:
            qw = core.quantize_rtn(wt, t.axis, cfg.block_size, cfg.symmetric)
        result.int4_layers.append({"layer": t.layer, "weight": t.weight, "kind": t.kind, "shape": list(t.shape),
                                   "axis": t.axis, "awq_alpha": qw.alpha, "relative_output_error": core.output_error(wt, qw, x)})
        result.quantized_values += t.numel
        del wt
        h, b, inits = rewrite.int4_replacement(node, t, qw, cfg.format)
        for tensor in inits:
            header = data.externalise(tensor)
            new_inits.append(header)
            n = int(header.external_data[-1].value)  # its length in model.onnx.data
            if tensor.name.endswith(rewrite.AWQ_SUFFIX):
                result.awq_scale_bytes += n
            else:
                result.int4_weight_bytes += n
        del inits
        head.extend(h)
        body.extend(b)
        result.quantized.append(t.weight)
        if cfg.method == "awq":
            result.awq_alpha[t.weight] = qw.alpha
        if evaluation is not None:
            layer_qw[t.weight] = qw
        del qw
    if current_layer is not None:
        evaluate_upto(current_layer + 1, layer_weights)
        layer_qw.clear()
    del layer_weights
    if evaluation is not None:
        evaluate_upto(spec.layers, {})
        t0 = time.perf_counter()
        head_qw = layer_qw.pop("lm_head.weight_t", None)
        result.accuracy_by_text = evaluation.finish(head_qw.dequantize() if head_qw is not None else None)
        result.accuracy = result.accuracy_by_text["held_out"]
        result.evaluation = "ok"
        result.evaluation_seconds = round(eval_seconds + time.perf_counter() - t0, 3)
    kept = [i for i in graph.initializer if i.name not in target_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(head + body)
    rewrite.ensure_ms_opset(model)
    return model


def _layer_of(weight: str) -> Optional[int]:
    parts = weight.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else None


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in torch: its CPU BLAS ran these [T, K] x [K, N] products ~6x faster than numpy's here (2 cores)."""
    import torch

    from quantize.core import to_tensor

    return torch.mm(to_tensor(a), to_tensor(b)).numpy()


class _Forward:
    """Hidden states of tokenized texts carried through the decoder one layer at a time, computing what the fused
    graph computes (RMSNorm, q|k|v + bias, rotary from the same cos/sin tables, causal GQA per text, SwiGLU), in
    FP32. The weights come from the caller, one MatMul at a time, so the same forward runs on the checkpoint's
    weights (the reference; AWQ's calibration) and on the weights as written (the evaluation's candidate)."""

    def __init__(self, spec: fused_graph.FusedSpec, lengths: np.ndarray, embedded: np.ndarray, cos: np.ndarray,
                 sin: np.ndarray):
        self.spec, self.lengths, self.cos, self.sin = spec, lengths, cos, sin
        self.residual = embedded  # [T, hidden]: the texts' real tokens, one text after another
        self.branch: Optional[np.ndarray] = None

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.spec.eps) * weight).astype(np.float32)

    def _rotary(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:  # x [L, heads, d], half-split rotation
        half = x.shape[-1] // 2
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def layer(self, i: int, matmul, small) -> dict[str, np.ndarray]:
        """Moves the hidden states past layer i. `matmul(name)` gives a MatMul weight [K, N] by graph name (asked
        for one at a time, in the order the layer uses them), `small(name)` a norm weight or bias, or None when the
        checkpoint has no such tensor. Returns the inputs of the layer's MatMuls by the graph's tensor names."""
        s = self.spec
        p, a, m = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        if self.branch is not None:
            self.residual = self.residual + self.branch
        x = self._rms(self.residual, small(f"{p}.input_layernorm.weight"))
        qkv = _mm(x, matmul(f"{a}.qkv_proj.weight"))
        bias = small(f"{a}.qkv_proj.bias")
        if bias is not None:
            qkv = qkv + bias
        d, h, kv = s.head_dim, s.heads, s.kv_heads
        attn = np.empty((qkv.shape[0], h * d), np.float32)
        start = 0
        for n in self.lengths:
            if n == 0:  # a text the tokenizer turned into nothing: no rows, nothing to attend
                continue
            rows = slice(start, start + n)
            pos = np.arange(n)
            q = self._rotary(qkv[rows, : h * d].reshape(n, h, d), pos)
            k = self._rotary(qkv[rows, h * d : (h + kv) * d].reshape(n, kv, d), pos)
            v = qkv[rows, (h + kv) * d :].reshape(n, kv, d)
            group = h // kv
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) * np.float32(d**-0.5)
            scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            attn[rows] = np.einsum("hqk,khd->qhd", probs, v).reshape(n, h * d)
            start += n
        o = _mm(attn, matmul(f"{a}.o_proj.weight"))
        self.residual = self.residual + o
        x2 = self._rms(self.residual, small(f"{p}.post_attention_layernorm.weight"))
        gate = _mm(x2, matmul(f"{m}.gate_proj.weight"))
        up = _mm(x2, matmul(f"{m}.up_proj.weight"))
        hidden = (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        del gate, up
        self.branch = _mm(hidden, matmul(f"{m}.down_proj.weight"))
        return {f"{p}.input_layernorm.out": x, f"{a}.out": attn, f"{p}.post_attention_layernorm.out": x2,
                f"{m}.hidden": hidden}

    def final(self, norm: np.ndarray) -> np.ndarray:
        """The final norm at every real position: lm_head's input."""
        return self._rms(self.residual + self.branch, norm)


def _texts(checkpoint: Path, sentences: tuple[str, ...], why: str) -> tuple[np.ndarray, np.ndarray]:
    """The real tokens of `sentences` one text after another, and each text's length (checkpoint's tokenizer)."""
    from quantize.evaluate import _encode

    try:
        ids, mask = _encode(checkpoint, sentences)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{why} tokenizes its sentences with the checkpoint's tokenizer, and {checkpoint} "
                       f"has none that loads ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not mask.any():
        raise BadInput(f"the tokenizer in {checkpoint} gives no tokens for {why}'s sentences")
    return ids[mask.astype(bool)], mask.sum(axis=1).astype(int)


def _small(lazy: dict):
    def get(name: str) -> Optional[np.ndarray]:
        return np.asarray(lazy[name][1](), np.float32) if name in lazy else None

    return get


class _Calibration:
    """AWQ's calibration activations, one layer at a time: the hidden states of the calibration sentences (the
    FP32 model's) carried through each layer (`_Forward`)."""

    def __init__(self, checkpoint: Path, spec: fused_graph.FusedSpec, lazy: dict, w, cfg: StreamConfig):
        from quantize.sentences import CALIBRATION

        sentences = CALIBRATION[: cfg.calibration_sentences] if cfg.calibration_sentences else CALIBRATION
        try:
            tokens, lengths = _texts(checkpoint, sentences, "AWQ calibration")
        except BadInput as exc:
            raise BadInput(f"{exc.message}; use --method rtn") from None
        self.lazy = lazy
        cos, sin = (np.asarray(lazy[n][1](), np.float32) for n in ("cos_cache", "sin_cache"))
        self.forward = _Forward(spec, lengths, w.rows("model.embed_tokens.weight", tokens), cos, sin)
        self.acts: dict[str, np.ndarray] = {}

    def advance(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's FP32 MatMul weights (by graph name); sets `acts` to the inputs of its MatMuls and moves the
        hidden states past it."""
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        w = {n: np.asarray(self.lazy[n][1](), np.float32)
             for n in (f"{a}.qkv_proj.weight", f"{a}.o_proj.weight", f"{m}.gate_proj.weight",
                       f"{m}.up_proj.weight", f"{m}.down_proj.weight")}
        self.acts = self.forward.layer(i, w.__getitem__, _small(self.lazy))
        return w

    def finish(self) -> None:
        """lm_head's input (with --quantize-lm-head): the final norm at every real position."""
        self.acts = {"model.norm.selected": self.forward.final(_small(self.lazy)("model.norm.weight"))}


class _Evaluation:
    """The accuracy of what is written, measured without the whole model: the held-out sentences the quantize
    stage gates on (`quantize.sentences.EVALUATION`) go through two forwards side by side, layer by layer — the
    checkpoint's FP32 weights (the reference) and the weights as written (the candidate: INT4 codes dequantized
    with their scales, zero points and AWQ activation scales; FP16 weights rounded as written) — and both final
    hidden states through the LM head, 128 positions at a time; then the quantize stage's own figures
    (`quantize.evaluate.DecoderMetrics`: logits cosine, top-1 agreement, perplexity, KL) on every position. Held:
    the two forwards' activations (tokens × the widest layer) and one weight at a time. The arithmetic is FP32
    throughout (an FP16 graph also computes in FP16: that part of its error is not measured here)."""

    def __init__(self, checkpoint: Path, spec: fused_graph.FusedSpec, lazy: dict, w, narrowed: set[str],
                 extra_texts: Optional[dict[str, tuple[str, ...]]] = None):
        from quantize.sentences import EVALUATION

        texts = {"held_out": EVALUATION, **(extra_texts or {})}
        parts = [_texts(checkpoint, sentences, "the accuracy evaluation") for sentences in texts.values()]
        tokens = np.concatenate([t for t, _ in parts])
        lengths = np.concatenate([n for _, n in parts])
        bounds = np.cumsum([0] + [len(t) for t, _ in parts])
        self.ranges = {name: (int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(texts)}  # token ranges
        self.spec, self.lazy, self.w, self.narrowed = spec, lazy, w, narrowed
        ends = np.cumsum(lengths)
        self.scored = np.ones(len(tokens), bool)
        self.scored[ends[lengths > 0] - 1] = False  # a text's last token has no next token of that text
        self.targets = np.append(tokens[1:], 0)
        cos, sin = (np.asarray(lazy[n][1](), np.float32) for n in ("cos_cache", "sin_cache"))
        embedded = w.rows("model.embed_tokens.weight", tokens)
        self.ref = _Forward(spec, lengths, embedded, cos, sin)
        self.cand = _Forward(spec, lengths, self._narrow("model.embed_tokens.weight", embedded), cos, sin)

    def _narrow(self, name: str, a: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """A tensor as the candidate graph holds it: rounded through FP16 where the writer narrowed it."""
        return a if a is None or name not in self.narrowed else _fp16(a).astype(np.float32)

    def layer(self, i: int, reference, candidate) -> None:
        """Both forwards past layer i: `reference(name)` gives the checkpoint's FP32 MatMul weight, `candidate(name)`
        the one the graph computes with."""
        small = _small(self.lazy)
        self.ref.layer(i, reference, small)
        self.cand.layer(i, candidate, lambda n: self._narrow(n, small(n)))

    def finish(self, head_candidate: Optional[np.ndarray] = None) -> dict[str, dict[str, float]]:
        """The figures of each text (`held_out` first); `head_candidate` is lm_head's dequantized weight
        [hidden, vocab] when it was quantized."""
        from quantize.evaluate import COMPARE_ROWS, DecoderMetrics

        small = _small(self.lazy)
        h_ref = self.ref.final(small("model.norm.weight"))
        h_cand = self.cand.final(self._narrow("model.norm.weight", small("model.norm.weight")))
        head = "lm_head.weight" if self.w.has("lm_head.weight") else "model.embed_tokens.weight"
        narrow = (lambda a: _fp16(a).astype(np.float32)) if "lm_head.weight_t" in self.narrowed else None
        metrics = {name: DecoderMetrics() for name in self.ranges}
        chunks = [(name, slice(start, min(start + COMPARE_ROWS, hi)))
                  for name, (lo, hi) in self.ranges.items() for start in range(lo, hi, COMPARE_ROWS)]
        for name, at in chunks:
            ref, got, col = [], [], 0
            for block in _table_blocks(self.w, head, False, lambda a: a):  # [rows of the vocabulary, hidden]
                ref.append(_mm(h_ref[at], block.T))
                if head_candidate is not None:
                    got.append(_mm(h_cand[at], head_candidate[:, col : col + len(block)]))
                else:
                    got.append(_mm(h_cand[at], (narrow(block) if narrow else block).T))
                col += len(block)
            metrics[name].add(np.concatenate(ref, axis=1), np.concatenate(got, axis=1), self.targets[at],
                              self.scored[at])
        return {name: m.result() for name, m in metrics.items()}
