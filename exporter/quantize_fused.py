"""The quantize stage's fused variants (`quantize --graph fused`), written by the streaming builder where it applies.

`quantize.quantize_model` traces: it loads the whole FP32 fused graph, quantizes it in memory and measures the
result against an FP32 ONNX Runtime session of the whole model — at R1-Distill-Qwen-1.5B's shape INT4 passed 18 GiB,
and a 7B FP32 reference alone is 30 GiB. For Qwen2 / Llama checkpoints in safetensors the streaming builder
(`exporter.stream_build.build`) writes the same graph from the checkpoint one tensor at a time — FP16 and INT4 RTN
byte for byte the traced bytes, AWQ with the same alphas and scales to float rounding — and measures the same
figures on the same texts layer by layer (`stream_build._Evaluation`: equal to the traced figures to 1e-4 on INT4).
So `builder="auto"` (the default) streams, into the same place, fingerprinted the same way (plus `builder:
stream`), with the same report schema and the same gate; it traces where streaming does not apply:

* mixed precision (the gate's bisection over a probe graph of the whole model keeps sensitive layers FP32);
* `--quantize-embeddings` and FP16 with FP16 graph IO (`--fp16-io`), which the builder does not write;
* a fused export whose checkpoint is gone or is not safetensors.

`builder="stream"` refuses those cases with the reason; `builder="traced"` keeps the whole-model path (parity
checks, benchmarks/stream_parity.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from quantize import QuantizeConfig, QuantizeResult, quantize_model
from quantize import core as qcore
from quantize import stage as qstage
from quantize.config import Method, Settings, Sizes

from .core import artifacts
from .core.errors import BadInput, StageFailed
from .core.profiles import Precision
from .core.stage import StageOutput
from .core.typed import to_data
from .core.ui import status

BUILDERS = ("auto", "stream", "traced")


def why_not_streamed(s: Settings, export_report: dict) -> Optional[str]:
    """Why these settings need the traced path, or None when the streaming builder writes them."""
    from .fused_graph import SUPPORTED

    if s.graph != "fused":
        return "the streaming builder writes the fused graph only (--graph fused)"
    if export_report.get("architecture") not in SUPPORTED.values():
        return f"the streaming builder covers {', '.join(SUPPORTED.values())}, not {export_report.get('architecture')}"
    if s.mixed_precision:
        return "mixed precision bisects over the whole model (traced)"
    if s.quantize_embeddings:
        return "--quantize-embeddings is written by the traced path only"
    if s.precision is Precision.FP16 and not s.keep_io_fp32:
        return "--fp16-io is written by the traced path only"
    source = Path(export_report.get("source", ""))
    if not (source / "config.json").is_file() or not any(source.glob("*.safetensors")):
        return f"the fused export's checkpoint {source} is not there as safetensors"
    return None


def quantize_variant(cfg: QuantizeConfig, builder: str = "auto") -> QuantizeResult:
    """`quantize_model`, with the fused variants streamed where they can be (module docstring)."""
    if builder not in BUILDERS:
        raise BadInput(f"builder must be one of {', '.join(BUILDERS)}, got {builder!r}")
    if builder == "traced" or cfg.graph != "fused":
        if builder == "stream":
            raise BadInput("--builder stream writes the fused graph only: add --graph fused")
        return quantize_model(cfg)
    s = qstage.resolve(cfg)
    layout = artifacts.ModelLayout.for_model(cfg.workdir, cfg.model)
    if not layout.has_export("fused"):
        raise BadInput(f"{cfg.model} has no FP32 export in {cfg.workdir}: run `r1deploy export {cfg.model} --graph fused` first")
    export_report = artifacts.read_export_report(layout, "fp32-fused")
    reason = why_not_streamed(s, export_report)
    if reason:
        if builder == "stream":
            raise BadInput(f"--builder stream cannot write this variant: {reason}")
        return quantize_model(cfg)
    return _streamed(cfg, s, layout, export_report)


def _streamed(cfg: QuantizeConfig, s: Settings, layout: artifacts.ModelLayout, export_report: dict) -> QuantizeResult:
    from quantize.sentences import CALIBRATION, EVALUATION

    from .stream_build import StreamConfig, _Evaluation, build

    started = time.perf_counter()
    variant = qstage.variant_name(s)
    final = layout.onnx_dir(variant)
    rejected = final.parent / f"{variant}.rejected.json"
    fp32_path = layout.onnx_path("fp32-fused")
    fp32_files = artifacts.onnx_files(fp32_path)
    # The same inputs as the traced stage (the fused export is written from this checkpoint, so its bytes stand for
    # the checkpoint's), and its settings plus the builder: a traced variant is not taken for a streamed one.
    inputs = artifacts.sha256_files(fp32_files, root=layout.root)
    inputs.update(artifacts.sha256_files([p for p in layout.tokenizer_dir.iterdir() if p.is_file()], root=layout.root))
    texts = {name: tuple(lines) for name, lines in cfg.extra_texts.items()}
    config = {**s.fingerprint(), "builder": "stream"}
    if texts:
        config["extra_texts"] = {name: artifacts.sha256_text("\n".join(lines)) for name, lines in sorted(texts.items())}
    output = StageOutput("quantize", final, inputs, config,
                         artifacts.tool_versions("r1deploy", "numpy", "onnx", "onnxruntime", "transformers", "torch"))
    if output.up_to_date(cfg.force):
        report = json.loads((final / qstage.REPORT).read_text())
        failure = qstage.gate_failure(s.gate, report["accuracy"], "decoder", s.gate_source)
        if failure:
            raise StageFailed(f"{layout.model} {variant}: {failure}")
        return qstage.result_from_report(layout.model, s, final, report, skipped=True,
                                         seconds=time.perf_counter() - started)

    int4 = s.precision is Precision.INT4
    scfg = StreamConfig(precision=s.precision.value, method=s.method.value, block_size=s.block_size,
                        format=s.format.value, symmetric=s.symmetric, quantize_lm_head=s.quantize_lm_head,
                        extra_texts=texts)
    checkpoint = Path(export_report["source"])
    with output.writing() as tmp:
        what = f"{s.method.value}, block {s.block_size}" if int4 else "fp16"
        with status(f"streaming {checkpoint.name} to {variant} ({what}), measured layer by layer"):
            r = build(checkpoint, tmp, scfg)
        if r.evaluation != "ok":
            raise StageFailed(f"{layout.model} {variant}: the accuracy could not be measured ({r.evaluation})")
        sizes = Sizes(
            model_bytes_fp32=sum(p.stat().st_size for p in fp32_files),
            model_bytes=artifacts.onnx_bytes(tmp / "model.onnx"),
            weight_bytes_fp32=4 * r.quantized_values,
            weight_bytes=r.int4_weight_bytes,
            quantized_weights=r.quantized_values,
            bits_per_weight=8 * r.int4_weight_bytes / r.quantized_values if r.quantized_values else 0.0,
            bits_per_weight_theoretical=(qcore.theoretical_bits_per_weight(s.block_size, s.symmetric)
                                         if r.quantized_values else 0.0),
            activation_scale_bytes=r.awq_scale_bytes,
        )
        report = {
            "model": layout.model,
            "kind": "decoder",
            "variant": variant,
            "settings": to_data(s),
            "builder": "stream",
            "sizes": to_data(sizes),
            "accuracy": r.accuracy,
            "accuracy_by_text": r.accuracy_by_text,
            "gate": to_data(s.gate) if s.gate else None,
            "gate_source": s.gate_source,
            "kept_layers": [],
            "evaluations": 1,
            "layers": [{**ly, "kept_fp32": False, "cosine_drop_alone": None} for ly in r.int4_layers],
            "not_quantized": r.not_quantized,
            "evaluation": {
                "sentences": len(EVALUATION),
                "texts": {"held_out": "quantize.sentences.EVALUATION (the gate reads it)",
                          **{name: f"{len(lines)} texts: {qstage.TEXT_SOURCES.get(name, 'given by the caller')}"
                             for name, lines in texts.items()}},
                "calibration_sentences": len(CALIBRATION) if int4 and s.method is Method.AWQ else 0,
                "how": "streamed: two forwards layer by layer (the checkpoint's FP32 weights, the weights as written)",
                "definitions": (_Evaluation.__doc__ or "").strip(),
                "evaluation_seconds": r.evaluation_seconds,
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        failure = qstage.gate_failure(s.gate, r.accuracy, "decoder", s.gate_source)
        if failure:
            artifacts.write_json(rejected, report)
            raise StageFailed(f"{layout.model} {variant} rejected: {failure}; report: {rejected}")
        artifacts.write_json(tmp / qstage.REPORT, report)
    rejected.unlink(missing_ok=True)
    return qstage.result_from_report(layout.model, s, final, report, skipped=False, seconds=time.perf_counter() - started)
