from __future__ import annotations

from pathlib import Path

import click

from ..core.profiles import AccuracyGate
from ..core.ui import out as console
from .common import App, emit, pass_app, profile_option


def _human(r) -> None:
    console.print(f"stream-build {r.precision}: {r.onnx_path} ({r.layers} layers, {r.tensors_written} tensors, "
                  f"{r.data_bytes / 2**20:,.1f} MiB of weights, {len(r.quantized)} INT4) in {r.seconds:.1f} s")
    if r.accuracy:
        a = r.accuracy
        gate = (f"; gate {r.gate.min_cosine} / {r.gate.min_top1}: passed" if r.gate else "; no gate")
        console.print(f"  accuracy vs the checkpoint's FP32 (layer by layer, {a['tokens']} tokens, "
                      f"{r.evaluation_seconds:.1f} s): logits cosine {a['cosine']:.4f}, top-1 {a['top1']:.4f}, "
                      f"KL {a['kl_divergence']:.4f}{gate}")
    else:
        console.print(f"  accuracy: {r.evaluation}")
    if r.report_path:
        console.print(f"  report: {r.report_path}")


@click.command("stream-build")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Directory for model.onnx + model.onnx.data.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4"]), default="fp32", show_default=True)
@click.option("--method", type=click.Choice(["rtn", "awq"]), default="awq", show_default=True, help="INT4 method.")
@click.option("--block-size", type=click.IntRange(min=16), default=128, show_default=True, help="INT4 block size.")
@click.option("--format", "fmt", type=click.Choice(["qdq", "ort"]), default="qdq", show_default=True,
              help="INT4 as DequantizeLinear→MatMul (qdq) or com.microsoft.MatMulNBits (ort).")
@click.option("--calibration-sentences", type=click.IntRange(min=1), help="AWQ: the first N calibration sentences [default: all].")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="fp16 / int4: measure logits cosine, top-1, perplexity and KL against the checkpoint's FP32 weights "
                   "on the quantize stage's held-out sentences, layer by layer (needs the checkpoint's tokenizer).")
@profile_option(help_text="Deployment profile whose accuracy gate applies (default: none).")
@click.option("--min-cosine", type=click.FloatRange(0, 1), help="Accuracy gate: refuse a logits cosine below this.")
@click.option("--min-top1", type=click.FloatRange(0, 1), help="Accuracy gate: refuse a top-1 agreement below this.")
@pass_app
def command(app: App, checkpoint, out_dir, precision, method, block_size, fmt, calibration_sentences, evaluate,
            profile_name, min_cosine, min_top1):
    """Build the fused decoder graph (Qwen2 / Llama) straight from a checkpoint's safetensors shards at FP32, FP16 or
    INT4, one tensor at a time: peak memory is about one layer, not the model (docs/fused_graph.md). The accuracy of
    FP16 / INT4 is measured on the way, layer by layer, against the checkpoint's FP32 weights, and gated when a
    profile or --min-cosine / --min-top1 says so (below the gate: exit 1, no model left, the report kept as
    stream_report.rejected.json). Nothing is compared with PyTorch here (that needs the whole model)."""
    from ..stream_build import StreamConfig, stream_build

    gate = app.profile(profile_name).accuracy if profile_name else None
    if min_cosine is not None or min_top1 is not None:
        base = gate or AccuracyGate(min_cosine=0.0, min_top1=0.0)
        gate = AccuracyGate(min_cosine=base.min_cosine if min_cosine is None else min_cosine,
                            min_top1=base.min_top1 if min_top1 is None else min_top1)
    cfg = StreamConfig(precision=precision, method=method, block_size=block_size, format=fmt,
                       calibration_sentences=calibration_sentences, evaluate=evaluate, gate=gate)
    emit(app, stream_build(checkpoint, out_dir, cfg), _human)
