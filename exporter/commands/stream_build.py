from __future__ import annotations

from pathlib import Path

import click

from ..core.ui import out as console
from .common import App, emit, pass_app


def _human(r) -> None:
    console.print(f"stream-build {r.precision}: {r.onnx_path} ({r.layers} layers, {r.tensors_written} tensors, "
                  f"{r.data_bytes / 2**20:,.1f} MiB of weights, {len(r.quantized)} INT4) in {r.seconds:.1f} s")


@click.command("stream-build")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Directory for model.onnx + model.onnx.data.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4"]), default="fp32", show_default=True)
@click.option("--method", type=click.Choice(["rtn", "awq"]), default="awq", show_default=True, help="INT4 method.")
@click.option("--block-size", type=click.IntRange(min=16), default=128, show_default=True, help="INT4 block size.")
@click.option("--format", "fmt", type=click.Choice(["qdq", "ort"]), default="qdq", show_default=True,
              help="INT4 as DequantizeLinear→MatMul (qdq) or com.microsoft.MatMulNBits (ort).")
@click.option("--calibration-sentences", type=click.IntRange(min=1), help="AWQ: the first N calibration sentences [default: all].")
@pass_app
def command(app: App, checkpoint, out_dir, precision, method, block_size, fmt, calibration_sentences):
    """Build the fused decoder graph (Qwen2 / Llama) straight from a checkpoint's safetensors shards at FP32, FP16 or
    INT4, one tensor at a time: peak memory is about one layer, not the model (docs/fused_graph.md). Unlike
    `export` + `quantize`, nothing is compared with PyTorch or gated on accuracy here (that needs the whole model)."""
    from ..stream_build import StreamConfig, stream_build

    cfg = StreamConfig(precision=precision, method=method, block_size=block_size, format=fmt,
                       calibration_sentences=calibration_sentences)
    emit(app, stream_build(checkpoint, out_dir, cfg), _human)
