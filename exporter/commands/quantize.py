from __future__ import annotations

import click

from quantize import Format, Method, QuantizeConfig, QuantizeResult

from .. import tiny_models
from ..core import artifacts
from ..core.profiles import Precision
from ..core.ui import out as console
from ..quantize_fused import quantize_variant
from .common import App, emit, force_option, memory_check_option, model_options, pass_app, profile_option

_ACCURACY_ROWS = (
    ("logits_cosine", "logits cosine (mean)"),
    ("logits_cosine_min", "logits cosine (worst token)"),
    ("top1_agreement", "top-1 agreement"),
    ("perplexity_fp32", "perplexity of the text: FP32"),
    ("perplexity", "perplexity of the text: this"),
    ("perplexity_delta", "perplexity delta"),
    ("kl_divergence", "KL divergence from FP32 (nats/token)"),
    ("embedding_cosine", "embedding cosine (mean)"),
    ("embedding_cosine_min", "embedding cosine (worst sentence)"),
    ("spearman", "Spearman of pairwise similarities"),
)


_TEXT_LABELS = {"corpus": "its training corpus", "held_out_domain": "in-domain text never trained on"}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _human(r: QuantizeResult) -> None:
    from rich.table import Table

    verb = "up to date" if r.skipped else f"written in {r.seconds:.1f} s"
    console.print(f"[bold]{r.model}[/bold] {r.variant} {verb}: {r.onnx_path}")
    table = Table(show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    s = r.sizes
    ratio = s.model_bytes / s.model_bytes_fp32 if s.model_bytes_fp32 else 0.0
    table.add_row("model size FP32 → this", f"{_mb(s.model_bytes_fp32)} → {_mb(s.model_bytes)} ({ratio:.1%})")
    if s.quantized_weights:
        table.add_row(
            f"quantized weights ({r.quantized_layers} layers)",
            f"{_mb(s.weight_bytes_fp32)} → {_mb(s.weight_bytes)} ({s.weight_bytes / s.weight_bytes_fp32:.1%})",
        )
        table.add_row("bits per weight (achieved / theoretical)", f"{s.bits_per_weight:.3f} / {s.bits_per_weight_theoretical:.3f}")
    for key, label in _ACCURACY_ROWS:
        if key in r.accuracy:
            table.add_row(label, f"{r.accuracy[key]:.5f}")
    # the embedded trained preset is also measured on its corpus and on in-domain text it never saw
    for text, figures in r.accuracy_by_text.items():
        if text != "held_out" and "top1_agreement" in figures:
            table.add_row(f"on {_TEXT_LABELS.get(text, text)}: cosine / top-1 / perplexity FP32 → this",
                          f"{figures['logits_cosine']:.4f} / {figures['top1_agreement']:.4f} / "
                          f"{figures['perplexity_fp32']:.3f} → {figures['perplexity']:.3f}")
    if r.gate:
        table.add_row("gate (min cosine / min top-1)", f"{r.gate['min_cosine']} / {r.gate['min_top1']}: passed")
    if r.not_quantized:
        table.add_row(f"left FP32: reduction dim not a multiple of the block ({len(r.not_quantized)})", "\n".join(r.not_quantized))
    if r.kept_layers:
        table.add_row(f"kept FP32 ({len(r.kept_layers)} layers, {_mb(s.kept_bytes)})", "\n".join(r.kept_layers))
    console.print(table)
    console.print(f"  report: {r.report_path}")


@click.command("quantize")
@model_options
@profile_option(help_text="Deployment profile whose precision, quantization settings and accuracy gate apply.")
@click.option("--precision", type=click.Choice([Precision.FP16.value, Precision.INT4.value]), help="Default: the profile's.")
@click.option("--method", type=click.Choice([m.value for m in Method]), help="INT4: rtn or awq (activation-aware).")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), help="INT4 block size along the reduction axis.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in Format]),
              help="INT4: qdq (standard DequantizeLinear, TensorRT) or ort (com.microsoft.MatMulNBits).")
@click.option("--symmetric/--asymmetric", default=None, help="INT4: zero point 0 (default) or one per block.")
@click.option("--quantize-embeddings", is_flag=True, help="INT4: also the Gather-ed embedding tables.")
@click.option("--quantize-lm-head", is_flag=True, help="INT4: also the output projection.")
@click.option("--fp16-io", is_flag=True, help="FP16: make graph inputs/outputs FP16 too (default: keep FP32).")
@click.option("--graph", "graph", type=click.Choice(["generic", "fused"]), default="generic", show_default=True,
              help="Which export to quantize: generic (onnx/fp32) or fused (onnx/fp32-fused; written to *-fused).")
@click.option("--min-cosine", type=float, help="Accuracy gate override; with int4 keeps sensitive layers FP32 to meet it.")
@click.option("--min-top1", type=float, help="Top-1 agreement gate override (decoders).")
@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="Keep the most sensitive layers FP32 until the gate holds (default: on with --min-cosine/--min-top1).")
@click.option("--builder", type=click.Choice(["auto", "stream", "traced"]), default="auto", show_default=True,
              help="--graph fused: stream the variant from the checkpoint one tensor at a time, measured layer by layer "
                   "(auto: wherever it applies — Qwen2/Llama safetensors, no mixed precision), or trace the whole "
                   "FP32 graph (docs/fused_graph.md).")
@memory_check_option
@force_option
@pass_app
def command(app: App, model, allow_pickle, trust_remote_code, profile_name, precision, method, block_size, fmt,
            symmetric, quantize_embeddings, quantize_lm_head, fp16_io, graph, min_cosine, min_top1, mixed_precision, builder,
            no_memory_check, force):
    """Quantize the exported FP32 ONNX model to FP16 or INT4, measure it against FP32 and apply the accuracy gate."""
    cfg = QuantizeConfig(
        model=model, workdir=app.workdir, profile=app.profile(profile_name) if profile_name else None,
        precision=precision, method=method, block_size=int(block_size) if block_size else None, format=fmt,
        symmetric=symmetric, quantize_embeddings=quantize_embeddings, quantize_lm_head=quantize_lm_head,
        keep_io_fp32=not fp16_io, graph=graph, min_cosine=min_cosine, min_top1=min_top1, mixed_precision=mixed_precision,
        force=force, extra_texts=tiny_models.quality_texts(model), memory_check=not no_memory_check,
    )
    # The FP32 export the stage reads, with default settings when there is none (found without loading the model).
    if not artifacts.ModelLayout.for_model(app.workdir, model).has_export(graph):
        from ..export import (  # imports torch: only when there is something to export
            ExportConfig,
            export_model,
        )

        export_model(ExportConfig(model=model, workdir=app.workdir, graph=graph, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code, memory_check=not no_memory_check))
    emit(app, quantize_variant(cfg, builder), _human)
