"""Export stage: checkpoint → ONNX (decoders with KV cache, encoders), verified against PyTorch."""

from __future__ import annotations

import enum
import gc
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .core import artifacts, memory
from .core.errors import BadInput, StageFailed, first_line
from .core.stage import StageOutput
from .core.typed import to_data
from .core.ui import quiet_library_logs, status
from .onnx_files import attach_external_weights, inline_external_data
from .sources import ModelKind, ModelSource, load_model, resolve_source
from .verify import CaseCheck, compare_onnx, torch_references
from .wrappers import (
    CacheLayout,
    DecoderWithPast,
    EncoderWithPooling,
    ShapeCase,
    cache_layout,
    encoder_input_names,
    make_inputs,
)


class Exporter(str, enum.Enum):
    DYNAMO = "dynamo"
    LEGACY = "legacy"  # TorchScript-based torch.onnx exporter


class GraphForm(str, enum.Enum):
    GENERIC = "generic"  # what torch emits: standard ONNX ops, every runtime (TensorRT included)
    FUSED = "fused"  # exporter.fused_graph: ONNX Runtime's fused attention, in-place KV buffer (Qwen2/Llama)


@dataclass
class ExportConfig:
    model: str = "r1-distill-tiny"
    workdir: Path = Path("build")
    opset: int = 21  # INT4 blocked DequantizeLinear needs 21
    exporter: Exporter = Exporter.DYNAMO
    graph: GraphForm = GraphForm.GENERIC
    external_data_threshold_mib: float = 2048.0  # above this the weights go to model.onnx.data
    verify: bool = True
    tolerance: float = 1e-4
    force: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    allow_weight_mismatch: bool = False  # export even if checkpoint tensor names do not match the architecture
    memory_check: bool = True  # refuse before loading when the estimated peak exceeds available memory (core.memory)

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.exporter = Exporter(self.exporter)
        self.graph = GraphForm(self.graph)
        if not 17 <= self.opset <= 23:
            raise BadInput(f"opset {self.opset} is outside the supported range 17..23")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise BadInput(f"--tolerance must be a number ≥ 0, got {self.tolerance!r}")
        if not (math.isfinite(self.external_data_threshold_mib) and self.external_data_threshold_mib >= 0):
            raise BadInput(f"--external-data-threshold-mib must be a number ≥ 0, got {self.external_data_threshold_mib!r}")

    def fingerprint_config(self) -> dict:
        if self.graph is GraphForm.FUSED:  # built from the weights: opset and exporter do not apply
            return {"graph": self.graph.value, "external_data_threshold_mib": self.external_data_threshold_mib,
                    "verify": self.verify, "tolerance": self.tolerance}
        return {
            "opset": self.opset,
            "exporter": self.exporter.value,
            "external_data_threshold_mib": self.external_data_threshold_mib,
            "verify": self.verify,
            "tolerance": self.tolerance,
        }

    @property
    def variant(self) -> str:
        return artifacts.onnx_variant("fp32", graph=self.graph.value)


@dataclass
class ExportResult:
    model: str
    kind: ModelKind
    architecture: str
    onnx_path: Path
    report_path: Path
    skipped: bool
    external_data: bool
    input_names: list[str]
    output_names: list[str]
    parameters: int = 0
    onnx_bytes: int = 0
    seconds: float = 0.0
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    cases: list[CaseCheck] = field(default_factory=list)


@dataclass
class _Graph:
    """What one torch.onnx.export call needs, for either exporter: dynamo takes `dynamic_shapes` (torch Dims per
    input), the legacy exporter `dynamic_axes` (axis names per input and output)."""

    wrapper: object
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    dynamic_axes: dict[str, dict[int, str]]
    layout: CacheLayout | None = None


def _decoder_graph(model) -> _Graph:
    import torch

    layout = cache_layout(model)
    input_names = ["input_ids", "attention_mask", "position_ids", *layout.names("past_key_values")]
    output_names = ["logits", *layout.names("present")]
    feeds = make_inputs(ModelKind.DECODER, ShapeCase("export-example", batch=2, seq=3, past=4),
                        model.config.vocab_size, layout, input_names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=1 << 17)
    past = torch.export.Dim("past_sequence", min=0, max=1 << 17)
    total = torch.export.Dim("total_sequence", min=1, max=1 << 18)
    # with *past varargs, the dynamo exporter wants the past tensors' shapes as ONE tuple
    past_axes = tuple({0: batch, 2: past} for _ in range(2 * layout.num_layers))
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "past_sequence"} for n in layout.names("past_key_values")},
        **{n: {0: "batch", 2: "total_sequence"} for n in layout.names("present")},
    }
    return _Graph(
        DecoderWithPast(model).eval(), tuple(feeds[n] for n in input_names), input_names, output_names,
        ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, past_axes), axes, layout,
    )


def _encoder_graph(model) -> _Graph:
    import torch

    input_names = encoder_input_names(model)
    output_names = ["last_hidden_state", "embeddings"]
    feeds = make_inputs(ModelKind.ENCODER, ShapeCase("export-example", batch=2, seq=8), model.config.vocab_size, None, input_names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=model.config.max_position_embeddings)
    axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "embeddings": {0: "batch"}})
    return _Graph(
        EncoderWithPooling(model).eval(), tuple(feeds[n] for n in input_names), input_names, output_names,
        tuple({0: batch, 1: seq} for _ in input_names), axes,
    )


def _torch_export(graph: _Graph, out: Path, cfg: ExportConfig) -> None:
    import torch

    common = dict(input_names=graph.input_names, output_names=graph.output_names, opset_version=cfg.opset)
    if cfg.exporter is Exporter.DYNAMO:
        torch.onnx.export(graph.wrapper, graph.args, str(out), dynamo=True, dynamic_shapes=graph.dynamic_shapes,
                          external_data=True, optimize=True, verbose=False, **common)
    else:
        _legacy_export(graph, out, common)


def _legacy_export(graph: _Graph, out: Path, common: dict) -> None:
    """The TorchScript exporter, without the copies of the weights it makes on a model below 2 GiB (2.3 GiB peak
    on a 125M model; ~1.0 GiB here). Two of its C++ passes take the weights by input name as their argument:
    - `_jit_pass_onnx_graph_shape_type_inference` converts every weight it is given to a constant for shape
      inference (+0.5 GiB); it is given only the small ones (≤ 1 MiB) — shapes never depend on the values of
      large weight matrices, and the graph is verified against PyTorch after export;
    - `Graph._export_onnx` serialises one ModelProto holding every weight, then its bytes, then their Python copy;
      it is given none, so the weights stay graph inputs of a small proto, and are then written as external
      data tensor by tensor (onnx_files.attach_external_weights).
    torch is pinned (the Makefile's constraints) and this exporter is frozen upstream; tests/test_export.py runs
    it and checks the result against PyTorch."""
    import torch

    weights: dict = {}
    shape_inference = torch._C._jit_pass_onnx_graph_shape_type_inference
    serialise = torch._C.Graph._export_onnx

    def with_small_weights(graph_, params, opset):
        return shape_inference(graph_, {k: v for k, v in params.items() if v.nbytes <= 1 << 20}, opset)

    def without_weights(self, params, *args):
        weights.update(params)
        return serialise(self, {}, *args)

    torch._C._jit_pass_onnx_graph_shape_type_inference = with_small_weights
    torch._C.Graph._export_onnx = without_weights
    try:
        torch.onnx.export(graph.wrapper, graph.args, str(out), dynamo=False, dynamic_axes=graph.dynamic_axes,
                          **common)
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = shape_inference
        torch._C.Graph._export_onnx = serialise
    if not weights:
        raise RuntimeError("the TorchScript exporter passed no weights to its serialiser")
    attach_external_weights(out, weights, _as_array)


def _as_array(tensor):
    """A numpy view (no copy, strides kept) of a CPU tensor's bytes; bfloat16, which numpy lacks, as int16."""
    import torch

    tensor = tensor.detach()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _copy_tokenizer(source: ModelSource, dest: Path) -> None:
    with artifacts.atomic_dir(dest) as tmp:
        for name in artifacts.TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, tmp / name)


def export_model(cfg: ExportConfig, source: ModelSource | None = None) -> ExportResult:
    """Export `cfg.model` to `<workdir>/<model>/onnx/fp32/model.onnx` and verify it; skip if up to date."""
    import torch

    started = time.perf_counter()
    artifacts.ensure_writable_dir(cfg.workdir)
    source = source or resolve_source(
        cfg.model, cfg.workdir, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code
    )
    layout_dirs = artifacts.ModelLayout(cfg.workdir, source.name)
    final = layout_dirs.onnx_dir(cfg.variant)
    report_path = final / artifacts.EXPORT_REPORT
    reusable = not cfg.force and report_path.is_file()
    if not reusable:
        # Nothing to reuse: refuse before hashing a checkpoint this machine cannot export (minutes at 7B).
        _check_memory(cfg, source)
    inputs = artifacts.sha256_files(
        [p for p in source.path.iterdir() if p.is_file() and not p.name.startswith("r1deploy-")], root=source.path
    )
    output = StageOutput(
        "export", final, inputs, cfg.fingerprint_config(), artifacts.tool_versions(),
        key={"export": cfg.fingerprint_config(), "architecture": source.architecture},
    )
    if output.up_to_date(cfg.force) and layout_dirs.tokenizer_dir.is_dir():
        report = artifacts.read_export_report(layout_dirs, cfg.variant)
        return ExportResult(
            model=source.name, kind=source.kind, architecture=source.architecture, onnx_path=final / "model.onnx",
            report_path=report_path, skipped=True, external_data=report["external_data"],
            input_names=report["input_names"], output_names=report["output_names"], parameters=report["parameters"],
            onnx_bytes=artifacts.onnx_bytes(final / "model.onnx"), seconds=time.perf_counter() - started,
            max_abs_diff=report.get("max_abs_diff", {}),
        )

    if reusable:  # an earlier output that is stale after all: checked now, before the work
        _check_memory(cfg, source)
    if cfg.graph is GraphForm.FUSED:
        return _export_fused(cfg, source, layout_dirs, output, started)
    with status(f"loading {source.name} ({source.architecture})"):
        model, _tokenizer = load_model(source, allow_weight_mismatch=cfg.allow_weight_mismatch)
    n_params = sum(p.numel() for p in model.parameters())
    vocab_size = model.config.vocab_size
    external = n_params * 4 > cfg.external_data_threshold_mib * (1 << 20)
    with output.writing() as tmp:
        out = tmp / "model.onnx"
        quiet_library_logs()
        with status(f"exporting {source.name} to ONNX (opset {cfg.opset}, {cfg.exporter.value})"), torch.no_grad():
            try:
                # The dynamo exporter always writes external data: the weights stream from the tensors to
                # disk instead of into an in-memory proto (1.0 vs 2.8 GiB peak on a 125M model).
                graph = _decoder_graph(model) if source.kind is ModelKind.DECODER else _encoder_graph(model)
                _torch_export(graph, out, cfg)
            except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                first = first_line(exc)
                raise StageFailed(f"ONNX export of {source.name} failed: {first}") from exc
        input_names, output_names, layout = graph.input_names, graph.output_names, graph.layout
        refs = torch_references(graph.wrapper, source.kind, input_names, vocab_size, layout) if cfg.verify else []
        del graph, model
        gc.collect()
        # both exporters write the weights to model.onnx.data (dynamo names it after the model file; the legacy
        # path writes it itself)
        written = sorted(p.name for p in tmp.iterdir())
        if written != ["model.onnx", "model.onnx.data"]:
            raise StageFailed(f"ONNX export of {source.name} wrote {written}, not model.onnx and model.onnx.data")
        cases: list[CaseCheck] = []
        if cfg.verify:
            # Verified while the weights are still external: ONNX Runtime then reads them straight into its own
            # buffers (0.53 vs 0.72 GiB peak for a session on a 125M model); folding them into one file after
            # is lossless (tests/test_export.py).
            with status("verifying ONNX Runtime against PyTorch"):
                cases = compare_onnx(out, refs, output_names, tolerances=dict.fromkeys(output_names, cfg.tolerance))
        if not external:
            inline_external_data(out)
        report = _report(source, GraphForm.GENERIC, n_params, cfg.opset, cfg.exporter.value, external, input_names,
                         output_names, to_data(layout) if layout else None, vocab_size, cases)
        artifacts.write_json(tmp / artifacts.EXPORT_REPORT, report)
    _copy_tokenizer(source, layout_dirs.tokenizer_dir)
    return _result(source, final, report, cases, started)


def _report(source: ModelSource, graph: GraphForm, n_params: int, opset: int, exporter: str, external: bool,
            input_names: list[str], output_names: list[str], cache, vocab_size, cases: list[CaseCheck],
            **extra) -> dict:
    """export_report.json: the same keys, in the same order, for both graph forms (`extra` before the checks)."""
    return {
        "model": source.name,
        "source": str(source.path),
        "architecture": source.architecture,
        "kind": source.kind.value,
        "graph": graph.value,
        "parameters": n_params,
        "opset": opset,
        "exporter": exporter,
        "external_data": external,
        "input_names": input_names,
        "output_names": output_names,
        "cache": cache,
        "vocab_size": vocab_size,
        **extra,
        "max_abs_diff": _max_diffs(cases),
        "cases": to_data(cases),
    }


def _result(source: ModelSource, final: Path, report: dict, cases: list[CaseCheck], started: float) -> ExportResult:
    return ExportResult(
        model=source.name, kind=source.kind, architecture=source.architecture, onnx_path=final / "model.onnx",
        report_path=final / artifacts.EXPORT_REPORT, skipped=False, external_data=report["external_data"],
        input_names=report["input_names"], output_names=report["output_names"], parameters=report["parameters"],
        onnx_bytes=artifacts.onnx_bytes(final / "model.onnx"), seconds=time.perf_counter() - started,
        max_abs_diff=report["max_abs_diff"], cases=cases,
    )


def _max_diffs(cases: list[CaseCheck]) -> dict[str, float]:
    max_diff: dict[str, float] = {}
    for case in cases:
        for o in case.outputs:
            max_diff[o.output] = max(max_diff.get(o.output, 0.0), o.max_abs_diff)
    return max_diff


def _export_fused(cfg: ExportConfig, source: ModelSource, layout_dirs: artifacts.ModelLayout, output: StageOutput,
                  started: float) -> ExportResult:
    """The fused graph (exporter.fused_graph), written from the checkpoint's weights and verified against
    PyTorch on rows of different lengths in one call."""
    import torch

    from . import fused_graph
    from .verify import compare_fused, fused_references

    if source.kind is not ModelKind.DECODER:
        raise BadInput(f"the fused graph is for decoders; {source.name} is an {source.kind.value}: use --graph generic")
    spec = fused_graph.spec_from_config(source.config)
    layout = CacheLayout(spec.layers, spec.cache_shape, spec.cache_shape)
    input_names = [*fused_graph.INPUTS, *layout.names("past_key_values")]
    output_names = ["logits", *layout.names("present")]
    with output.writing() as tmp:
        out = tmp / "model.onnx"
        with status(f"writing the fused graph of {source.name} from its weights"):
            try:
                fused_graph.build(source.path, out)
            except KeyError as exc:  # the graph is written from the checkpoint's tensors by name: one is not there
                raise BadInput(
                    f"{source.path} does not match its config.json: the fused graph needs weight {exc.args[0]!r}, "
                    "which is not in the checkpoint (the fused graph cannot be written without it; --graph generic "
                    "with --allow-weight-mismatch exports with random weights instead)"
                ) from None
        n_params = 0
        refs = []
        if cfg.verify:
            with status(f"loading {source.name} ({source.architecture}) for verification"):
                model, _tokenizer = load_model(source, allow_weight_mismatch=cfg.allow_weight_mismatch)
            n_params = sum(p.numel() for p in model.parameters())
            with torch.no_grad():
                refs = fused_references(DecoderWithPast(model).eval(), layout, spec.vocab)
            del model
            gc.collect()
        cases: list[CaseCheck] = []
        if cfg.verify:
            with status("verifying ONNX Runtime (fused graph) against PyTorch"):
                cases = compare_fused(out, refs, output_names, cfg.tolerance)
        n_params = n_params or _checkpoint_parameters(source)
        external = n_params * 4 > cfg.external_data_threshold_mib * (1 << 20)
        if not external:
            inline_external_data(out)
        report = _report(source, GraphForm.FUSED, n_params, 21, "r1deploy-fused", external, input_names, output_names,
                         to_data(layout), spec.vocab, cases, max_sequence_length=spec.max_positions)
        artifacts.write_json(tmp / artifacts.EXPORT_REPORT, report)
    _copy_tokenizer(source, layout_dirs.tokenizer_dir)
    return _result(source, output.directory, report, cases, started)


def _check_memory(cfg: ExportConfig, source: ModelSource) -> None:
    """Both graph forms hold the whole model in FP32 while they verify (the generic one also while it traces);
    the fused graph written without verification reads the checkpoint one tensor at a time."""
    if cfg.graph is GraphForm.FUSED and not cfg.verify:
        return
    if all(f.suffix == ".safetensors" for f in source.weight_files):
        fp32_bytes = 4 * _checkpoint_parameters(source)
    else:  # pickles: no header to count from; their size, as if FP32
        fp32_bytes = sum(f.stat().st_size for f in source.weight_files)
    alternative = (
        "For ONNX Runtime, `r1deploy stream-build` writes the fused graph (FP32, FP16 or INT4) one layer at a time; "
        "the generic graph TensorRT builds from needs a machine with more memory"
    )
    memory.require(memory.MemoryNeed.of(f"exporting {source.name} through PyTorch", fp32_bytes,
                                        memory.EXPORT_PEAK_PER_FP32_BYTE), alternative, enabled=cfg.memory_check)


def _checkpoint_parameters(source: ModelSource) -> int:
    """Parameter count from the safetensors headers (no weights read), for --no-verify."""
    import json as _json

    total = 0
    for f in source.weight_files:
        with open(f, "rb") as fh:
            header = _json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                total += n
    return total
