"""Quantize stage: `<model>/onnx/fp32` → `<model>/onnx/fp16` or `<model>/onnx/int4-<method>-b<block>-<format>`,
measured against FP32 on held-out text and gated by the deployment profile's accuracy floor."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.core import artifacts, memory
from exporter.core.errors import BadInput, StageFailed
from exporter.core.profiles import (
    BLOCK_SIZES,
    AccuracyGate,
    DeploymentProfile,
    Precision,
    QuantSpec,
    get_profile,
)
from exporter.core.stage import StageOutput
from exporter.core.typed import to_data
from exporter.core.ui import status

from . import core, evaluate, rewrite
from .config import Format, Method, QuantizeConfig, QuantizeResult, Settings, Sizes
from .sentences import CALIBRATION, EVALUATION

REPORT = "quantize_report.json"


def resolve(cfg: QuantizeConfig) -> Settings:
    profile: Optional[DeploymentProfile]
    profile = get_profile(cfg.profile) if isinstance(cfg.profile, str) else cfg.profile
    spec = profile.quantization if profile else QuantSpec()
    precision = cfg.precision or (profile.precision if profile else None)
    if precision is None:
        raise BadInput("say what to produce: --precision fp16|int4 or --profile NAME")
    if precision is Precision.FP32:
        raise BadInput("fp32 is the export stage's output; quantize produces fp16 or int4")
    flags = cfg.min_cosine is not None or cfg.min_top1 is not None
    gate: Optional[AccuracyGate] = profile.accuracy if profile else None
    source = f"profile {profile.name}" if profile else "none"
    if flags:
        base = gate or AccuracyGate(min_cosine=0.0, min_top1=0.0)
        gate = AccuracyGate(
            min_cosine=base.min_cosine if cfg.min_cosine is None else cfg.min_cosine,
            min_top1=base.min_top1 if cfg.min_top1 is None else cfg.min_top1,
        )
        source = "flags" if not profile else f"flags over profile {profile.name}"
    mixed = cfg.mixed_precision if cfg.mixed_precision is not None else (flags or spec.mixed_precision)
    block = cfg.block_size or spec.block_size
    if block not in BLOCK_SIZES:
        raise BadInput(f"block size {block} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    return Settings(
        precision=precision,
        method=cfg.method or Method(spec.method),
        block_size=block,
        format=cfg.format or Format(spec.format),
        symmetric=spec.symmetric if cfg.symmetric is None else cfg.symmetric,
        quantize_embeddings=cfg.quantize_embeddings,
        quantize_lm_head=cfg.quantize_lm_head,
        keep_io_fp32=cfg.keep_io_fp32,
        gate=gate,
        gate_source=source,
        mixed_precision=mixed and precision is Precision.INT4 and gate is not None,
        graph=cfg.graph,
    )


def variant_name(s: Settings) -> str:
    return artifacts.onnx_variant(s.precision.value, s.method.value, s.block_size, s.format.value, graph=s.graph)


# What the texts an embedded preset brings (exporter.tiny_models.quality_texts) are; others are the caller's.
TEXT_SOURCES = {
    "corpus": "the training text of the embedded preset (exporter.tiny_models.training_texts)",
    "held_out_domain": "in-domain text the embedded preset never trained on (exporter.tiny_corpus.HELD_OUT)",
}


def _exported(cfg: QuantizeConfig) -> artifacts.ModelLayout:
    """The export stage's fp32 output this stage reads. This stage does not run the export itself (stages do not
    call each other): the CLI, the pipeline and the engine stage's preparation export first."""
    layout = artifacts.ModelLayout.for_model(cfg.workdir, cfg.model)
    if not layout.has_export(cfg.graph):
        flag = " --graph fused" if cfg.graph == "fused" else ""
        raise BadInput(f"{cfg.model} has no FP32 export in {cfg.workdir}: run `r1deploy export {cfg.model}{flag}` first")
    return layout


def gate_failure(gate: Optional[AccuracyGate], acc: dict, kind: str, source: str) -> Optional[str]:
    if gate is None:
        return None
    what = "logits" if kind == "decoder" else "embedding"
    if acc["cosine"] < gate.min_cosine:
        return f"{what} cosine {acc['cosine']:.4f} is below the gate {gate.min_cosine} ({source})"
    # Top-1 agreement is a next-token notion: encoders are gated on cosine alone.
    if kind == "decoder" and acc["top1"] < gate.min_top1:
        return f"top-1 agreement {acc['top1']:.4f} is below the gate {gate.min_top1} ({source})"
    return None


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > evaluate.EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def _check_io(base: onnx.ModelProto, model: onnx.ModelProto) -> None:
    for what in ("input", "output"):
        before = [v.name for v in getattr(base.graph, what)]
        after = [v.name for v in getattr(model.graph, what)]
        if before != after:
            raise StageFailed(f"quantized graph changed its {what} names: {before} → {after}")


@dataclass
class _Int4Layer:
    target: rewrite.WeightTarget
    qw: core.QuantizedWeight
    error: float  # relative output error of this layer alone on calibration activations
    sensitivity: Optional[float] = None  # mixed precision: output cosine drop with only this layer quantized


@dataclass
class _Int4Build:
    model: onnx.ModelProto
    layers: list[_Int4Layer]
    skipped: list[dict]
    kept: list[str]
    evaluations: int  # full-model accuracy measurements the mixed-precision search made


def choose_targets(targets: list[rewrite.WeightTarget], s: Settings) -> tuple[list[rewrite.WeightTarget], list[dict]]:
    """The weights the settings quantize, and those left FP32 with the reason (listed in the report)."""
    wanted = {"matmul", "expert"} | ({"lm_head"} if s.quantize_lm_head else set()) | (
        {"embedding"} if s.quantize_embeddings else set()
    )
    chosen, skipped = [], []
    for t in targets:
        if t.kind not in wanted:
            continue
        if t.shape[t.axis] % s.block_size:
            # Blocks must tile the reduction axis exactly: a partial block is legal ONNX but not every
            # consumer (TensorRT) accepts it, so such weights stay FP32 and are listed.
            skipped.append({"layer": t.layer, "shape": list(t.shape), "reason": f"reduction dim {t.shape[t.axis]} is not a multiple of {s.block_size}"})
            continue
        chosen.append(t)
    return chosen, skipped


def _quantize_weights(base: onnx.ModelProto, s: Settings, export_report: dict, tokenizer_dir: Path):
    chosen, skipped = choose_targets(rewrite.find_targets(base, export_report.get("vocab_size")), s)
    if not chosen:
        raise StageFailed(f"no weight in {export_report['model']} can be quantized with block size {s.block_size}")
    weights = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer if i.name in {t.weight for t in chosen}}
    acts: dict[str, np.ndarray] = {}
    if s.method is Method.AWQ or s.mixed_precision:
        calib = evaluate.tokenize(tokenizer_dir, CALIBRATION, export_report)
        names = sorted({t.activation for t in chosen if t.activation and t.kind in ("matmul", "lm_head")})
        with status(f"calibrating on {len(CALIBRATION)} sentences ({len(names)} activations)"):
            acts = evaluate.capture_activations(base, calib, names)
    layers = []
    with status(f"quantizing {len(chosen)} weights ({s.method.value}, block {s.block_size}, {'sym' if s.symmetric else 'asym'})"):
        for t in chosen:
            w = weights[t.weight]
            x = acts.get(t.activation) if t.activation else None
            if s.method is Method.AWQ and x is not None:
                qw = core.quantize_awq(w, x, s.block_size, s.symmetric)
            elif s.method is Method.AWQ:
                qw = core.quantize_clipped(w, t.axis, s.block_size, s.symmetric)
            else:
                qw = core.quantize_rtn(w, t.axis, s.block_size, s.symmetric)
            layers.append(_Int4Layer(t, qw, core.output_error(w, qw, x)))
    return layers, skipped


SENSITIVITY_SENTENCES = 16  # calibration sentences used to rank layers (not the evaluation set the gate reads)


def _build_int4(base, s: Settings, export_report: dict, tokenizer_dir: Path, ref: evaluate.Reference) -> _Int4Build:
    layers, skipped = _quantize_weights(base, s, export_report, tokenizer_dir)
    quantized = {ly.target.weight: (ly.target, ly.qw) for ly in layers}
    kept: list[str] = []
    evaluations = 0
    if s.mixed_precision:
        kept, evaluations = _keep_sensitive(base, layers, quantized, s, export_report, tokenizer_dir, ref)
    final = {w: tq for w, tq in quantized.items() if tq[0].layer not in kept}
    return _Int4Build(rewrite.write_int4(base, final, s.format.value), layers, skipped, kept, evaluations)


def _keep_sensitive(base, layers: list[_Int4Layer], quantized: dict, s: Settings, export_report: dict,
                    tokenizer_dir: Path, ref: evaluate.Reference) -> tuple[list[str], int]:
    """The fewest layers to keep FP32 so that the gate holds.

    Sensitivity is measured, not guessed: with every other layer FP32, quantize one layer and record the drop of
    output cosine on calibration text. Layers are kept most-sensitive first; the count doubles until the gate
    holds on the evaluation text, then bisects. All of it runs in one ONNX Runtime session of a probe graph
    whose per-layer switches are graph inputs (`rewrite.write_probe`)."""
    kind = export_report["kind"]
    probe, gates = rewrite.write_probe(base, quantized)
    sess = evaluate.session(probe)

    def switches(on: set[str]) -> dict[str, np.ndarray]:
        return {gates[ly.target.weight]: np.array(float(ly.target.layer in on), np.float32) for ly in layers}

    names = [ly.target.layer for ly in layers]
    evaluations = 1
    if gate_failure(s.gate, evaluate.measure(ref, probe, sess, switches(set(names))), kind, s.gate_source) is None:
        return [], evaluations
    with status(f"mixed precision: measuring the sensitivity of {len(names)} layers"):
        calib = evaluate.tokenize(tokenizer_dir, CALIBRATION[:SENSITIVITY_SENTENCES], export_report)
        calib_ref = evaluate.Reference(kind, calib, ref.output, evaluate.run(sess, calib, [ref.output], switches(set()))[ref.output])
        drop = {n: 1.0 - evaluate.measure(calib_ref, probe, sess, switches({n}))["cosine"] for n in names}
    order = sorted(names, key=lambda n: drop[n], reverse=True)

    def passes(k: int) -> bool:
        nonlocal evaluations
        evaluations += 1
        acc = evaluate.measure(ref, probe, sess, switches(set(order[k:])))
        return gate_failure(s.gate, acc, kind, s.gate_source) is None

    lo, hi = 0, 1
    with status(f"mixed precision: keeping the most sensitive layers until the gate ({s.gate_source}) holds"):
        while hi < len(order) and not passes(hi):
            lo, hi = hi, min(2 * hi, len(order))
        while hi - lo > 1:  # all kept (hi == len) is FP32 again and meets any gate
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    for ly in layers:
        ly.sensitivity = drop[ly.target.layer]
    return order[:hi], evaluations


def _int4_bytes(model: onnx.ModelProto, layers: list[_Int4Layer], kept: set[str]) -> tuple[int, int]:
    """Bytes the written model spends on the quantized weights (codes, scales, zero points) and, apart, on
    AWQ's activation scales (one float per input channel; foldable into a preceding op, so not weight bits)."""
    prefixes = tuple(ly.target.weight + "_" for ly in layers if ly.target.layer not in kept)
    weights = awq = 0
    for init in model.graph.initializer:
        if init.name.startswith(prefixes):
            n = len(init.raw_data) if init.raw_data else numpy_helper.to_array(init).nbytes
            if init.name.endswith(rewrite.AWQ_SUFFIX):
                awq += n
            else:
                weights += n
    return weights, awq


def quantize_model(cfg: QuantizeConfig) -> QuantizeResult:
    """Write `<workdir>/<model>/onnx/<variant>/model.onnx` + quantize_report.json; skip if up to date."""
    started = time.perf_counter()
    s = resolve(cfg)
    layout = _exported(cfg)
    base_variant = artifacts.onnx_variant("fp32", graph=s.graph)
    export_report = artifacts.read_export_report(layout, base_variant)
    kind = export_report["kind"]
    variant = variant_name(s)
    final = layout.onnx_dir(variant)
    rejected = final.parent / f"{variant}.rejected.json"
    fp32_path = layout.onnx_path(base_variant)
    fp32_files = artifacts.onnx_files(fp32_path)
    need = memory.MemoryNeed.of(
        f"quantizing {layout.model} to {variant} (the whole FP32 graph in memory)", sum(f.stat().st_size for f in fp32_files),
        memory.QUANTIZE_FP16_PEAK_PER_FP32_BYTE if s.precision is Precision.FP16 else memory.QUANTIZE_INT4_PEAK_PER_FP32_BYTE,
    )
    alternative = ("For ONNX Runtime, `quantize --graph fused` (or `stream-build`) converts one layer at a time; the "
                   "generic graph TensorRT builds from needs a machine with more memory")
    reusable = not cfg.force and (final / REPORT).is_file()
    if not reusable:
        # Nothing to reuse: refuse before hashing an export this machine cannot quantize (minutes at 7B).
        memory.require(need, alternative, enabled=cfg.memory_check)
    inputs = artifacts.sha256_files(fp32_files, root=layout.root)
    inputs.update(artifacts.sha256_files([p for p in layout.tokenizer_dir.iterdir() if p.is_file()], root=layout.root))
    # Texts measured besides the held-out sentences (decoders only). The report holds their figures, so they are
    # part of what decides whether an earlier output is still this one (named by a digest; absent when none, so
    # a quantization without them keeps the fingerprint it always had).
    texts = {name: tuple(lines) for name, lines in cfg.extra_texts.items()} if kind == "decoder" else {}
    config = s.fingerprint()
    if texts:
        config["extra_texts"] = {name: artifacts.sha256_text("\n".join(lines)) for name, lines in sorted(texts.items())}
    output = StageOutput("quantize", final, inputs, config,
                         artifacts.tool_versions("r1deploy", "numpy", "onnx", "onnxruntime", "transformers"))

    if output.up_to_date(cfg.force):
        report = json.loads((final / REPORT).read_text())
        failure = gate_failure(s.gate, report["accuracy"], kind, s.gate_source)
        if failure:
            raise StageFailed(f"{layout.model} {variant}: {failure}")
        return result_from_report(layout.model, s, final, report, skipped=True, seconds=time.perf_counter() - started)
    if reusable:  # an earlier output that is stale after all: checked now, before the work
        memory.require(need, alternative, enabled=cfg.memory_check)

    with status(f"FP32 reference on {len(EVALUATION)} held-out sentences"):
        # From the file, before this process loads the model: ONNX Runtime reads the weights itself, and the
        # session is gone before the conversion below holds its own copy (never two copies of the FP32 weights).
        fp32_sess = evaluate.session(fp32_path)
        ref = evaluate.reference(fp32_path, evaluate.tokenize(layout.tokenizer_dir, EVALUATION, export_report), kind,
                                 sess=fp32_sess)
        extra_refs = {
            name: evaluate.reference(fp32_path, evaluate.tokenize(layout.tokenizer_dir, lines, export_report), kind,
                                     sess=fp32_sess)
            for name, lines in texts.items()
        }
        del fp32_sess
    layers: list[_Int4Layer] = []
    skipped: list[dict] = []
    kept: list[str] = []
    evaluations = 0
    if s.precision is Precision.FP16:
        base = onnx.load(str(fp32_path), load_external_data=False)  # the graph, for _check_io
        with status("converting to FP16 (norms, softmax, exp, rotary angles stay FP32)"):
            # the weights are read from the file one tensor at a time (never all FP32 weights in this process)
            model = rewrite.to_fp16_from_file(fp32_path, s.keep_io_fp32,
                                              kv_cache_fp16=export_report.get("graph") == "fused")
    else:
        base = onnx.load(str(fp32_path))
        build = _build_int4(base, s, export_report, layout.tokenizer_dir, ref)
        model, layers, skipped, kept, evaluations = build.model, build.layers, build.skipped, build.kept, build.evaluations
    _check_io(base, model)
    del base
    # Counted before saving: a save with external data moves the bytes out of the in-memory tensors.
    weight_bytes, awq_bytes = _int4_bytes(model, layers, set(kept))

    with output.writing() as tmp:
        out = tmp / "model.onnx"
        _save(model, out)
        del model  # the session below reads the file: one copy of the weights, ONNX Runtime's
        # Measure the file the next stage will read, not the in-memory graph.
        sess = evaluate.session(out)
        accuracy = evaluate.measure(ref, out, sess)
        by_text = {"held_out": accuracy, **{name: evaluate.measure(r, out, sess) for name, r in extra_refs.items()}}
        quantized = [ly for ly in layers if ly.target.layer not in kept]
        n_weights = sum(ly.target.numel for ly in quantized)
        sizes = Sizes(
            model_bytes_fp32=sum(p.stat().st_size for p in fp32_files),
            model_bytes=artifacts.onnx_bytes(out),
            weight_bytes_fp32=4 * n_weights,
            weight_bytes=weight_bytes,
            quantized_weights=n_weights,
            bits_per_weight=8 * weight_bytes / n_weights if n_weights else 0.0,
            bits_per_weight_theoretical=core.theoretical_bits_per_weight(s.block_size, s.symmetric) if layers else 0.0,
            kept_bytes=4 * sum(ly.target.numel for ly in layers if ly.target.layer in kept),
            activation_scale_bytes=awq_bytes,
        )
        report = {
            "model": layout.model,
            "kind": kind,
            "variant": variant,
            "settings": to_data(s),
            "sizes": to_data(sizes),
            "accuracy": accuracy,
            "accuracy_by_text": by_text,
            "gate": to_data(s.gate) if s.gate else None,
            "gate_source": s.gate_source,
            "kept_layers": kept,
            "evaluations": evaluations,
            "layers": [
                {
                    "layer": ly.target.layer, "weight": ly.target.weight, "kind": ly.target.kind,
                    "shape": list(ly.target.shape), "axis": ly.target.axis, "kept_fp32": ly.target.layer in kept,
                    "awq_alpha": ly.qw.alpha, "relative_output_error": ly.error, "cosine_drop_alone": ly.sensitivity,
                }
                for ly in layers
            ],
            "not_quantized": skipped,
            "evaluation": {
                "sentences": len(EVALUATION),
                "texts": {"held_out": "quantize.sentences.EVALUATION (the gate reads it)",
                          **{name: f"{len(lines)} texts: {TEXT_SOURCES.get(name, 'given by the caller')}" for name, lines in texts.items()}},
                "calibration_sentences": len(CALIBRATION),
                "onnxruntime_session_config": evaluate.ORT_SESSION_CONFIG,
                "definitions": (evaluate.__doc__ or "").strip(),
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        failure = gate_failure(s.gate, accuracy, kind, s.gate_source)
        if failure:
            # The atomic directory is discarded: nothing appears where the engine stage reads. The report
            # is kept beside it so the numbers that failed can be inspected.
            artifacts.write_json(rejected, report)
            raise StageFailed(f"{layout.model} {variant} rejected: {failure}; report: {rejected}")
        artifacts.write_json(tmp / REPORT, report)
    rejected.unlink(missing_ok=True)
    return result_from_report(layout.model, s, final, report, skipped=False, seconds=time.perf_counter() - started)


def result_from_report(model: str, s: Settings, final: Path, report: dict, *, skipped: bool, seconds: float) -> QuantizeResult:
    return QuantizeResult(
        model=model,
        variant=report["variant"],
        precision=s.precision,
        onnx_path=final / "model.onnx",
        report_path=final / REPORT,
        skipped=skipped,
        sizes=Sizes(**report["sizes"]),
        accuracy=report["accuracy"],
        accuracy_by_text=report.get("accuracy_by_text", {"held_out": report["accuracy"]}),
        gate=report["gate"] if not skipped else (to_data(s.gate) if s.gate else None),
        kept_layers=report["kept_layers"],
        not_quantized=[entry["layer"] for entry in report["not_quantized"]],
        quantized_layers=sum(1 for ly in report["layers"] if not ly["kept_fp32"]),
        seconds=seconds,
    )
